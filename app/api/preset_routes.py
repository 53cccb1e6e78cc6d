"""``/studio/v1/presets``: list and save presets, and run one with a photo and a few words.

``POST /studio/v1/presets/{name}/jobs`` answers exactly as ``POST /studio/v1/jobs`` does (202 with
the job's id, state, place and links): a preset run is an ordinary job on the durable queue.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.context import ApiContext
from app.api.schemas import JobAccepted
from app.api.security import Caller
from app.api.studio_routes import job_view
from app.presets import PresetStore, describe_preset, list_presets, preset_from_request, submit_preset_job
from contract.images import MAX_SEED


class PresetBody(BaseModel):
    name: str = Field(..., description="Lower-case letters, digits, - and _ (the file name).")
    mode: Literal["txt2img", "img2img"] = "img2img"
    request: dict[str, Any] = Field(
        ..., description="The body of /sdapi/v1/txt2img or img2img; its prompt holds {prompt}."
    )
    description: str = ""
    longest_side: int = Field(512, ge=64, le=2048)
    blocked_words: list[str] = Field(default_factory=list)
    safety_checker: bool = False
    replace: bool = Field(False, description="Overwrite a preset of the same name.")


class PresetRunBody(BaseModel):
    prompt: str = Field("", max_length=2000, description="The few words that fill the preset's {prompt}.")
    image: str | None = Field(None, description="The photo: base64 (JPEG, PNG, WebP or HEIC).")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)


def decode_base64_photo(text: str | None) -> bytes | None:
    if not text:
        return None
    data = text.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(status_code=422, detail="image: not base64 image data") from None


def preset_router(context: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/studio/v1/presets", tags=["presets"])
    caller_dependency = Depends(context.auth.require_user)
    services = context.services

    def store() -> PresetStore:
        return PresetStore.for_services(services)  # the folder may change with the settings

    @router.get("", dependencies=[caller_dependency])
    def get_presets() -> dict[str, Any]:
        """Every preset, with whether it can run now (``ready``) and why not (``error``)."""
        return {"presets": list_presets(store(), services.registry)}

    @router.get("/{name}", dependencies=[caller_dependency])
    def get_preset(name: str) -> dict[str, Any]:
        presets = store()
        return describe_preset(presets.load(name), presets, services.registry)

    @router.post("", status_code=201, dependencies=[caller_dependency])
    def save_preset(body: PresetBody) -> dict[str, Any]:
        """Save a preset from a request body; checked as a run would use it (422 names the field,
        404 a model that is not in models/), 409 when the name is taken and ``replace`` is false."""
        presets = store()
        preset = preset_from_request(
            body.name,
            body.mode,
            body.request,
            description=body.description,
            longest_side=body.longest_side,
            blocked_words=body.blocked_words,
            safety_checker=body.safety_checker,
        )
        if not body.replace and presets.path_for(preset.name).exists():
            raise HTTPException(
                status_code=409,
                detail=f"A preset named '{preset.name}' exists; send replace: true to overwrite it.",
            )
        presets.save(preset, services.registry, models_root=services.settings.models_dir)
        return describe_preset(preset, presets, services.registry)

    @router.post("/{name}/jobs", status_code=202, response_model=JobAccepted)
    async def run_preset(name: str, body: PresetRunBody, caller: Caller = caller_dependency) -> Any:
        """Queue a run of the preset with a photo and a few words; answers as ``POST /studio/v1/jobs``."""
        photo = decode_base64_photo(body.image)
        _, job_id = await run_in_threadpool(
            submit_preset_job, services, store(), name, body.prompt, photo, owner=caller.owner, seed=body.seed
        )
        status = await run_in_threadpool(context.queue.status, job_id)
        view = job_view(context, status)
        return {"id": job_id, "state": view["state"], "position": view["position"], "links": view["links"]}

    return router
