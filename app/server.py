"""Start the web UI process: no model is loaded before the first request unless asked."""

from __future__ import annotations

import logging

from app.auth import parse_credentials
from app.settings import StudioSettings

log = logging.getLogger(__name__)


def serve(settings: StudioSettings, *, block: bool = True) -> int:
    from app.services import StudioServices
    from app.ui import build_ui

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    credentials = parse_credentials(settings.auth, settings.auth_file)
    if settings.listen and not credentials:
        log.warning("--listen without --auth: anyone on your network can use this studio")
    services = StudioServices.create(settings)
    if settings.preload_model and services.registry.checkpoints():
        services.models.load()
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=credentials or None,
        allowed_paths=[str(settings.outputs_dir)],
        prevent_thread_lock=not block,
        show_error=False,
        quiet=False,
    )
    return 0
