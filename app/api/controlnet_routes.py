"""ControlNet as A1111's sd-webui-controlnet extension exposes it over HTTP.

Clients send units inside ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}`` with the
extension's field names (the request models turn them into ``controlnet_units``), and list models
and preprocessors at ``/controlnet/model_list`` and ``/controlnet/module_list``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from app.api.context import ApiContext

CONTROLNET_SCRIPT = "controlnet"
CONTROLNET_API_VERSION = 2


class ModelListResponse(BaseModel):
    model_list: list[str]


class ModuleListResponse(BaseModel):
    module_list: list[str]
    module_detail: dict[str, Any]


class VersionResponse(BaseModel):
    version: int


def unavailable_alwayson_scripts(alwayson_scripts: dict[str, Any]) -> list[str]:
    """Names of always-on scripts in a request that ask to run and that this server does not have
    (everything but ControlNet; a script whose first argument is ``False`` is switched off)."""
    unknown = []
    for name, script in alwayson_scripts.items():
        if str(name).lower() == CONTROLNET_SCRIPT:
            continue
        args = script.get("args", []) if isinstance(script, dict) else script
        if isinstance(args, list) and args and args[0] not in (False, None, {"enabled": False}):
            unknown.append(str(name))
    return unknown


def controlnet_router(context: ApiContext) -> APIRouter:
    router = APIRouter(
        prefix="/controlnet", tags=["controlnet"], dependencies=[Depends(context.auth.require_user)]
    )

    @router.get("/version", response_model=VersionResponse)
    def version() -> dict[str, Any]:
        return {"version": CONTROLNET_API_VERSION}

    @router.get("/model_list", response_model=ModelListResponse)
    def model_list(update: bool = Query(True)) -> dict[str, Any]:
        """ControlNet models in models/ControlNet, as ``name [hash]``."""
        from pipelines.controlnet import model_catalogue

        return model_catalogue(context.services.registry.paths.folder("controlnet"))

    @router.get("/module_list", response_model=ModuleListResponse)
    def module_list(alias_names: bool = Query(False)) -> dict[str, Any]:
        """Preprocessors by API name (or UI label with ``alias_names``) and their sliders."""
        from pipelines.controlnet import preprocessor_catalogue

        return preprocessor_catalogue(alias_names=alias_names)

    return router
