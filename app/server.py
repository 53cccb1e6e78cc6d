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
import time
from typing import TYPE_CHECKING, Any

from app.auth import parse_credentials
from app.settings import StudioSettings
from app.ui.job_runner import BROWSER_ID_HEAD

if TYPE_CHECKING:
    from app.services import StudioServices

log = logging.getLogger(__name__)


def serve(settings: StudioSettings, *, block: bool = True) -> int:
    from app.services import StudioServices

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ui_credentials, api_credentials = studio_credentials(settings)
    if settings.max_pixels is not None:
        from contract.budget import set_max_pixels

        set_max_pixels(settings.max_pixels)  # before any worker process starts: they inherit it
    serve_api = settings.api or settings.nowebui
    announcement = startup_announcement(
        settings, ui_open=not ui_credentials, api_open=serve_api and not api_credentials
    )
    services = StudioServices.create(settings)
    services.start_queue()
    if settings.preload_model and services.registry.checkpoints():
        services.workers.set_default_model(services.selected_checkpoint, load=True, timeout=0)
    try:
        if not serve_api:
            return _launch_ui_only(services, ui_credentials, block=block, announcement=announcement)
        app = build_served_app(services, ui_credentials, api_credentials)
        _run_uvicorn(app, settings, block=block, announcement=announcement)
        return 0
    finally:
        if block:  # the server has stopped: running jobs wait in the store for the next start
            services.queue.abandon()


def lan_addresses() -> list[str]:
    """This PC's IPv4 addresses that others on the LAN can reach (loopback left out)."""
    import socket

    found: list[str] = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(str(info[4][0]))
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent
        try:
            probe.connect(("10.254.254.254", 1))
            found.append(str(probe.getsockname()[0]))
        except OSError:
            pass
    unique = dict.fromkeys(a for a in found if not a.startswith(("127.", "0.")))
    return list(unique)


def startup_announcement(settings: StudioSettings, *, ui_open: bool, api_open: bool) -> list[str]:
    """The lines printed once the studio answers: where to open it, and (last, so nobody misses
    it) who else can reach it. ``--listen`` lists the LAN addresses a colleague can open, never
    ``0.0.0.0``."""
    port = settings.port
    lines = ["", f"SD Studio is ready: open http://127.0.0.1:{port} on this PC"]
    if settings.listen:
        addresses = lan_addresses()
        if addresses:
            lines.append("Others on your network can open:")
            lines += [f"  http://{address}:{port}" for address in addresses]
        else:
            lines.append(f"No network address found; others reach this PC's address on port {port}.")
        if not settings.nowebui and ui_open:
            lines.append(
                "WARNING: --listen without --auth: anyone on your network can use this studio and see "
                "its pictures. Add --auth user:password."
            )
        if api_open:
            lines.append(
                "WARNING: --listen with --api but without --api-auth: anyone on your network can use "
                "the API. Add --api-auth user:password."
            )
    return lines


def _announce(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


def studio_credentials(settings: StudioSettings) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(UI credentials, API credentials)``: each side takes its own flag (``--auth``/``--auth-file``
    for the UI, ``--api-auth`` for the API), else the other side's. So ``--api --api-auth u:p`` also
    locks the mounted UI, whose routes (``/config``, ``/gradio_api/file=...``, the queue, uploads)
    reach the same outputs and jobs as the API."""
    ui_own = parse_credentials(settings.auth, settings.auth_file)
    api_own = parse_credentials(settings.api_auth, flag="--api-auth")
    return ui_own or api_own, api_own or ui_own


def build_served_app(
    services: StudioServices,
    ui_credentials: list[tuple[str, str]],
    api_credentials: list[tuple[str, str]],
) -> Any:
    """The app ``--api``/``--nowebui`` serve: the REST API, with the UI mounted at ``/`` unless
    ``--nowebui``."""
    from app.api import build_api_app

    app: Any = build_api_app(services, credentials=api_credentials)
    if not services.settings.nowebui:
        app = _mount_ui(app, services, ui_credentials)
    return app


def _launch_ui_only(
    services: StudioServices,
    credentials: list[tuple[str, str]],
    *,
    block: bool,
    announcement: list[str] | None = None,
) -> int:
    from app.ui import build_ui
    from app.ui_file_guard import output_guard_kwargs

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
        prevent_thread_lock=True,
        show_error=False,
        quiet=not settings.share,  # our own lines say where to go (gradio's would say 0.0.0.0)
        run_history=False,  # never keep users' inputs and images in browser storage
        app_kwargs=output_guard_kwargs(services, credentials),
        head=BROWSER_ID_HEAD,  # the id that brings a user's jobs back after a reload
    )
    _announce(announcement or [])
    if block:
        demo.block_thread()
    return 0


def _mount_ui(app: Any, services: StudioServices, credentials: list[tuple[str, str]]) -> Any:
    import gradio as gr

    from app.ui import build_ui
    from app.ui_file_guard import output_guard_kwargs

    settings = services.settings
    if settings.share:
        log.warning("--share is not available together with --api; serving on %s only", settings.host)
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=1)
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=credentials or None,
        allowed_paths=[str(settings.outputs_dir)],
        max_file_size=f"{settings.max_upload_mb:g}mb",
        show_error=False,
        run_history=False,
        app_kwargs=output_guard_kwargs(services, credentials),
        head=BROWSER_ID_HEAD,
    )
    for route in app.router.routes:
        if getattr(route, "path", None) == "" and hasattr(route, "app"):  # the Mount at "/"
            route.app = GradioErrorBoundary(route.app)
    return app


class GradioErrorBoundary:
    """Keeps an exception inside the mounted Gradio app from reaching the API's error handlers.

    Gradio answers its own routes (``/gradio_api/...``), a failure included (its error middleware
    sends its own status), then re-raises; without this boundary the API's handlers would take
    the exception for an API error and log it as one. Here it is logged once, as Gradio's, and
    answered with a plain 500 only if Gradio had not answered yet.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.warning("Gradio error on %s", scope.get("path"), exc_info=True)
            if scope.get("type") == "http" and not started:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send({"type": "http.response.body", "body": b"Internal Server Error"})


def _run_uvicorn(
    app: Any, settings: StudioSettings, *, block: bool, announcement: list[str] | None = None
) -> None:
    import uvicorn

    # A restart leaves the running job "running" in the job store on purpose: startup requeues
    # it, exactly as after a crash (stopping the queue would record it as cancelled instead).
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5
        )
    )

    def announce_when_started() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.1)
        if server.started:
            _announce(announcement or [])

    threading.Thread(target=announce_when_started, name="announce", daemon=True).start()
    if block:
        server.run()
    else:
        threading.Thread(target=server.run, name="api-server", daemon=True).start()
