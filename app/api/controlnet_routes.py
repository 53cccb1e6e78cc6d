"""ControlNet as A1111's sd-webui-controlnet extension exposes it over HTTP.

Clients send units inside ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}`` with the
extension's field names (the request models turn them into ``controlnet_units``), and list models
and preprocessors at ``/controlnet/model_list`` and ``/controlnet/module_list``;
``/controlnet/detect`` runs a preprocessor alone and returns its maps.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field, model_validator
from starlette.concurrency import run_in_threadpool

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


class DetectRequest(BaseModel):
    """The extension's ``POST /controlnet/detect`` body (its field names)."""

    controlnet_module: str = Field("none", description="Preprocessor, e.g. 'canny', 'depth_midas'.")
    controlnet_input_images: list[str] = Field(
        default_factory=list, max_length=16, description="Images to preprocess, base64."
    )
    controlnet_processor_res: int = Field(512, description="Preprocessor resolution; -1 = default.")
    controlnet_threshold_a: float = Field(-1, description="First preprocessor parameter; -1 = default.")
    controlnet_threshold_b: float = Field(-1, description="Second preprocessor parameter; -1 = default.")
    low_vram: bool = False

    @model_validator(mode="before")
    @classmethod
    def _client_spelling(cls, data: Any) -> Any:
        """The ``webuiapi`` client names the images ``controlnet_images``."""
        if isinstance(data, dict) and "controlnet_images" in data and "controlnet_input_images" not in data:
            data = {**data, "controlnet_input_images": data["controlnet_images"]}
        return data


class DetectResponse(BaseModel):
    images: list[str]
    info: str


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
        from pipelines.controlnet.model_files import model_catalogue

        return model_catalogue(context.services.registry.paths.folder("controlnet"))

    @router.get("/module_list", response_model=ModuleListResponse)
    def module_list(alias_names: bool = Query(False)) -> dict[str, Any]:
        """Preprocessors by API name (or UI label with ``alias_names``) and their sliders."""
        from pipelines.controlnet.preprocessors import preprocessor_catalogue

        return preprocessor_catalogue(alias_names=alias_names)

    @router.post("/detect", response_model=DetectResponse)
    async def detect(body: DetectRequest) -> dict[str, Any]:
        """Run one preprocessor on each image (annotator networks from models/ControlNet/annotators)
        and return the maps as base64 PNGs."""
        from app.api.images import decode_base64_image
        from pipelines.controlnet.preprocessors import resolve_preprocessor

        resolve_preprocessor(body.controlnet_module)  # an unknown module is a clear error at once
        images = [
            decode_base64_image(text, field=f"controlnet_input_images.{index}")
            for index, text in enumerate(body.controlnet_input_images)
        ]
        maps = await run_in_threadpool(_detect_maps, context, body, images)
        return {"images": maps, "info": "Success"}

    return router


def _detect_maps(context: ApiContext, body: DetectRequest, images: list[Any]) -> list[str]:
    import base64
    import io

    from pipelines.controlnet.preprocessors import default_annotator_dirs, run_preprocessor

    services = context.services
    encoded = []
    with context.device_exclusive():
        for image in images:
            detected = run_preprocessor(
                body.controlnet_module,
                image.convert("RGB"),
                resolution=body.controlnet_processor_res,
                threshold_a=body.controlnet_threshold_a,
                threshold_b=body.controlnet_threshold_b,
                annotator_dir=default_annotator_dirs(services.settings.models_dir),
                annotators=services.engine.annotator_cache,
            )
            buffer = io.BytesIO()
            detected.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded
