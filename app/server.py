"""Start the web UI process: no model is loaded before the first request unless asked.

Three ways to serve, all on one port:

* default: the Gradio UI alone (``demo.launch``, so ``--share`` works);
* ``--api``: the REST API app with the UI mounted under it at ``/`` (uvicorn);
* ``--nowebui``: the REST API alone; gradio is never imported.

The durable job queue starts in every mode, so jobs a crash interrupted run again at startup.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from app.auth import parse_credentials
from app.settings import StudioSettings

if TYPE_CHECKING:
    from app.services import StudioServices

log = logging.getLogger(__name__)


def serve(settings: StudioSettings, *, block: bool = True) -> int:
    from app.services import StudioServices

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ui_credentials = parse_credentials(settings.auth, settings.auth_file)
    api_credentials = parse_credentials(settings.api_auth, flag="--api-auth") or ui_credentials
    serve_api = settings.api or settings.nowebui
    if settings.listen and not settings.nowebui and not ui_credentials:
        log.warning("--listen without --auth: anyone on your network can use this studio")
    if settings.listen and serve_api and not api_credentials:
        log.warning("--listen with --api but without --api-auth: anyone on your network can use the API")
    services = StudioServices.create(settings)
    services.start_queue()
    if settings.preload_model and services.registry.checkpoints():
        services.workers.set_default_model(services.selected_checkpoint, load=True, timeout=0)
    if not serve_api:
        return _launch_ui_only(services, ui_credentials, block=block)

    from app.api import build_api_app

    app: Any = build_api_app(services, credentials=api_credentials)
    if not settings.nowebui:
        app = _mount_ui(app, services, ui_credentials)
    _run_uvicorn(app, settings, block=block)
    return 0


def _launch_ui_only(services: StudioServices, credentials: list[tuple[str, str]], *, block: bool) -> int:
    from app.ui import build_ui

    settings = services.settings
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=credentials or None,
        allowed_paths=[str(settings.outputs_dir)],
        max_file_size=f"{settings.max_upload_mb:g}mb",
        prevent_thread_lock=not block,
        show_error=False,
        quiet=False,
        run_history=False,  # never keep users' inputs and images in browser storage
    )
    return 0


def _mount_ui(app: Any, services: StudioServices, credentials: list[tuple[str, str]]) -> Any:
    import gradio as gr

    from app.ui import build_ui

    settings = services.settings
    if settings.share:
        log.warning("--share is not available together with --api; serving on %s only", settings.host)
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=1)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=credentials or None,
        allowed_paths=[str(settings.outputs_dir)],
        max_file_size=f"{settings.max_upload_mb:g}mb",
        show_error=False,
        run_history=False,
    )


def _run_uvicorn(app: Any, settings: StudioSettings, *, block: bool) -> None:
    import uvicorn

    # A restart leaves the running job "running" in the job store on purpose: startup requeues
    # it, exactly as after a crash (stopping the queue would record it as cancelled instead).
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5
        )
    )
    if block:
        server.run()
    else:
        threading.Thread(target=server.run, name="api-server", daemon=True).start()
