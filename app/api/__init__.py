"""The REST API: A1111's ``/sdapi/v1``, ControlNet's ``/controlnet``, the studio's ``/studio/v1``.

:func:`build_api_app` returns a FastAPI app that the server runs alone (``--nowebui``) or with the
Gradio UI mounted under it (``--api``). This package never imports gradio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.services import StudioServices

__all__ = ["build_api_app"]


def build_api_app(services: StudioServices, *, credentials: list[tuple[str, str]] | None = None) -> FastAPI:
    """The API app over ``services``; with ``credentials`` every route, the file server and the
    OpenAPI pages need HTTP Basic auth."""
    from fastapi import Depends, FastAPI
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse

    from app.api.a1111_routes import a1111_router
    from app.api.context import ApiContext
    from app.api.controlnet_routes import controlnet_router
    from app.api.errors import install_error_handlers
    from app.api.files import files_router
    from app.api.limits import BodySizeLimit, NoLocalFileReads
    from app.api.preset_routes import preset_router
    from app.api.security import ApiAuth
    from app.api.studio_routes import studio_router
    from app.discord.interactions import discord_router
    from pipelines.generation.engine import ENGINE_VERSION

    context = ApiContext(services=services, auth=ApiAuth(list(credentials or [])))
    app = FastAPI(
        title="SD Studio API",
        version=ENGINE_VERSION.split()[-1],
        description="AUTOMATIC1111-compatible /sdapi/v1 and ControlNet routes, plus /studio/v1 jobs.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.api_context = context
    install_error_handlers(app)
    for router in (a1111_router, controlnet_router, studio_router, files_router):
        app.include_router(router(context))
    app.include_router(preset_router(context))
    from app.api.metrics import metrics_router

    app.include_router(metrics_router(context))
    app.include_router(discord_router(services))  # signed by Discord, not HTTP Basic

    guard = [Depends(context.auth.require_user)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guard)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    def swagger_page() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="SD Studio API")

    max_bytes = int(services.settings.max_upload_mb * 1024 * 1024)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)
    app.add_middleware(NoLocalFileReads)
    return app
