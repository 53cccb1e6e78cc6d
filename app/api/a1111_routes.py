"""``/sdapi/v1/*``: AUTOMATIC1111's REST API, with its field names, defaults and response shapes.

Generation endpoints block until the image is done, as A1111's do, but each is a job in the
studio's durable queue: recorded before it runs, fair between users, resumed after a crash, and
visible under ``/studio/v1/jobs`` by the id given in the ``X-Job-Id`` header and ``info.job_id``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.context import ApiContext, read_image_base64
from app.api.controlnet_routes import CONTROLNET_SCRIPT, unavailable_alwayson_scripts
from app.api.images import as_data_url, decode_base64_image, sanitise_request_images
from app.api.schemas import (
    API_ONLY_FIELDS,
    EmbeddingsResponse,
    ExtrasBatchImagesApiRequest,
    ExtrasBatchImagesResponse,
    ExtrasSingleImageApiRequest,
    ExtrasSingleImageResponse,
    FaceRestorerItem,
    Img2ImgApiRequest,
    LatentUpscalerModeItem,
    LoraItem,
    MemoryResponse,
    OptionsUpdate,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    PromptStyleItem,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    SDVaeItem,
    TextToImageResponse,
    Txt2ImgApiRequest,
    UpscalerItem,
)
from app.api.security import Caller
from contract.images import ExtrasRequest, Img2ImgRequest, Txt2ImgRequest
from pipelines.errors import ModelNotFoundError, StudioError

log = logging.getLogger(__name__)

INTERNAL_ERROR_PREFIX = "internal error"


class JobFailedError(StudioError):
    """A queued job ended in failure; its message is the engine's, meant for the user."""


class InternalJobError(Exception):
    """A job failed on a bug; the log has the traceback, the client gets a generic 500."""


# --- building job requests ---------------------------------------------------------------------
def _refuse_scripts(body: Txt2ImgApiRequest | Img2ImgApiRequest) -> None:
    """Selectable scripts and always-on scripts other than ControlNet are not available: 422 with
    A1111's messages rather than silently generating without them."""
    if body.script_name:
        raise HTTPException(status_code=422, detail=f"Script '{body.script_name}' not found")
    unknown = unavailable_alwayson_scripts(body.alwayson_scripts)
    if unknown:
        raise HTTPException(status_code=422, detail=f"always on script {unknown[0]} not found")


def build_generation_request(
    context: ApiContext,
    body: Txt2ImgApiRequest | Img2ImgApiRequest,
    model: type[Txt2ImgRequest | Img2ImgRequest],
) -> Txt2ImgRequest | Img2ImgRequest:
    _refuse_scripts(body)
    payload = body.model_dump(mode="json", exclude=API_ONLY_FIELDS)
    if payload.get("controlnet_units"):
        payload["controlnet_units"] = [unit for unit in payload["controlnet_units"] if unit.get("enabled")]
    settings = dict(payload.get("override_settings") or {})
    for key, value in context.option_overrides.items():
        settings.setdefault(key, value)
    if settings.get("sd_vae") in ("Automatic", None):
        settings.pop("sd_vae", None)
    elif settings["sd_vae"] not in ("None", ""):
        context.services.registry.find("vae", str(settings["sd_vae"]))  # unknown VAE: 404 now
    payload["override_settings"] = settings
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint:
        context.find_checkpoint(str(checkpoint))
    else:
        context.pin_checkpoint(settings)
    for style in body.styles:
        context.services.styles.get(style)  # an unknown style is a 400 now, not a failed job later
    payload = sanitise_request_images(payload)
    return model.model_validate(payload)


def echo_parameters(body: BaseModel, *, drop_images: bool = False) -> dict[str, Any]:
    """A1111 echoes the request (init images and mask only with ``include_init_images``)."""
    parameters = body.model_dump(mode="json", exclude={"mode"})
    if drop_images:
        parameters["init_images"] = None
        parameters["mask"] = None
    return parameters


async def run_job(context: ApiContext, request: Any, caller: Caller, response: Response) -> Any:
    """Queue ``request``, wait for it, and turn failure into the right HTTP answer."""
    job_id = await context.submit(request, caller)
    response.headers["X-Job-Id"] = job_id
    status = await context.wait(job_id)
    if status.state == "failed":
        error = status.error or "the job failed"
        if error.startswith(INTERNAL_ERROR_PREFIX):
            raise InternalJobError(f"job {job_id}: {error}")
        raise JobFailedError(error)
    return status


def _encoded_outputs(paths: list[str]) -> list[str]:
    encoded = []
    for path in paths:
        try:
            encoded.append(read_image_base64(path))
        except OSError:
            log.warning("output %s vanished before it could be returned", path)
    return encoded


# --- the router --------------------------------------------------------------------------------
def a1111_router(context: ApiContext) -> APIRouter:
    services = context.services
    router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    caller_dependency = Depends(context.auth.require_user)

    @router.post("/txt2img", response_model=TextToImageResponse)
    async def txt2img(body: Txt2ImgApiRequest, response: Response, caller: Caller = caller_dependency) -> Any:
        """Generate images from a prompt (blocks until done)."""
        return await _generate(body, Txt2ImgRequest, caller, response)

    @router.post("/img2img", response_model=TextToImageResponse)
    async def img2img(body: Img2ImgApiRequest, response: Response, caller: Caller = caller_dependency) -> Any:
        """img2img, inpainting (``mask``) and outpainting (blocks until done)."""
        return await _generate(body, Img2ImgRequest, caller, response)

    async def _generate(
        body: Txt2ImgApiRequest | Img2ImgApiRequest,
        model: type[Txt2ImgRequest | Img2ImgRequest],
        caller: Caller,
        response: Response,
    ) -> Any:
        request = await run_in_threadpool(build_generation_request, context, body, model)
        status = await run_job(context, request, caller, response)
        images = await run_in_threadpool(_encoded_outputs, status.images) if body.send_images else []
        info = dict(status.info or {})
        info.setdefault("interrupted", status.state == "cancelled")
        info["job_id"] = status.id
        drop = isinstance(body, Img2ImgApiRequest) and not body.include_init_images
        return {
            "images": images,
            "parameters": echo_parameters(body, drop_images=drop),
            "info": json.dumps(info),
        }

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(
        body: ExtrasSingleImageApiRequest, response: Response, caller: Caller = caller_dependency
    ) -> Any:
        """Upscale and/or restore faces in one image."""
        payload = body.model_dump(mode="json")
        payload["image"] = await run_in_threadpool(lambda: as_data_url(body.image, field="image"))
        status = await run_job(context, ExtrasRequest.model_validate(payload), caller, response)
        images = await run_in_threadpool(_encoded_outputs, status.images)
        return {"html_info": _first_infotext(status.info), "image": images[0] if images else None}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(
        body: ExtrasBatchImagesApiRequest, response: Response, caller: Caller = caller_dependency
    ) -> Any:
        """Upscale and/or restore faces in several images (one queued job each)."""
        common = body.model_dump(mode="json", exclude={"imageList", "image"})

        def checked_requests() -> list[ExtrasRequest]:
            return [
                ExtrasRequest.model_validate(
                    {**common, "image": as_data_url(item.data, field=f"imageList.{index}.data")}
                )
                for index, item in enumerate(body.imageList)
            ]

        requests = await run_in_threadpool(checked_requests)
        images: list[str] = []
        html_info = ""
        for request in requests:
            status = await run_job(context, request, caller, response)
            images += await run_in_threadpool(_encoded_outputs, status.images)
            html_info = html_info or _first_infotext(status.info)
        return {"html_info": html_info, "images": images}

    @router.post("/png-info", response_model=PNGInfoResponse, dependencies=[caller_dependency])
    def png_info(body: PNGInfoRequest) -> Any:
        """The generation parameters stored in an image (PNG text chunk or EXIF)."""
        from pipelines.outputs.infotext import parse_infotext
        from pipelines.outputs.saving import read_png_parameters

        image = decode_base64_image(body.image, field="image")
        info = read_png_parameters(image) or ""
        items = {
            str(key): value
            for key, value in image.info.items()
            if isinstance(value, (str, int, float)) and key != "parameters"
        }
        parameters: dict[str, Any] = {}
        if info:
            parsed = parse_infotext(info)
            parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.params}
            size = parsed.params.get("Size", "")
            if "x" in size:
                parameters["Size-1"], _, parameters["Size-2"] = size.partition("x")
        return {"info": info, "items": items, "parameters": parameters}

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = Query(False), caller: Caller = caller_dependency) -> Any:
        """The running job's progress, ETA and a live preview (A1111's shape)."""
        running = context.running_jobs(caller)
        waiting = context.queued_count(caller)
        job = running[0] if running else None
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": f"job {job.id}" if job else "",
            "job_count": len(running) + waiting,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.steps if job else 0,
        }
        if job is None:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
            }
        current_image = None
        if not skip_current_image and job.preview is not None:
            current_image = base64.b64encode(job.preview).decode("ascii")
        return {
            "progress": job.progress,
            "eta_relative": job.eta_seconds or 0.0,
            "state": state,
            "current_image": current_image,
            "textinfo": job.message or None,
        }

    @router.post("/interrupt")
    def interrupt(caller: Caller = caller_dependency) -> Any:
        """Stop the running job after the current step; finished images are kept."""
        for job in context.running_jobs(caller):
            context.queue.interrupt(job.id)
        return {}

    @router.post("/skip")
    def skip(caller: Caller = caller_dependency) -> Any:
        """Abandon the current batch of the running job and go on with the next one."""
        for job in context.running_jobs(caller):
            context.queue.skip(job.id)
        return {}

    @router.get("/options", dependencies=[caller_dependency])
    def get_options() -> dict[str, Any]:
        """Settings in A1111's names (``sd_model_checkpoint`` is the current model's title)."""
        return current_options(context)

    @router.post("/options", dependencies=[caller_dependency])
    def set_options(body: OptionsUpdate) -> None:
        """Change options; ``sd_model_checkpoint`` loads that model (unknown name: 400)."""
        if body.sd_vae is not None and body.sd_vae not in ("Automatic", "None"):
            try:
                services.registry.find("vae", body.sd_vae)
            except ModelNotFoundError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
        if body.sd_model_checkpoint is not None:
            switch_checkpoint(context, body.sd_model_checkpoint)
        if body.sd_vae is not None:
            context.option_overrides["sd_vae"] = body.sd_vae
        if body.CLIP_stop_at_last_layers is not None:
            context.option_overrides["CLIP_stop_at_last_layers"] = body.CLIP_stop_at_last_layers
        return None

    @router.get("/cmd-flags", dependencies=[caller_dependency])
    def cmd_flags() -> dict[str, Any]:
        """The command-line flags in effect (passwords are never shown)."""
        settings = services.settings.model_dump(mode="json")
        for secret in ("auth", "api_auth"):
            settings[secret] = "***" if settings.get(secret) else None
        settings["ckpt"] = settings.get("default_checkpoint")
        return settings

    @router.get("/samplers", response_model=list[SamplerItem], dependencies=[caller_dependency])
    def samplers() -> Any:
        from contract.samplers import sampler_catalogue

        return sampler_catalogue()

    @router.get("/schedulers", response_model=list[SchedulerItem], dependencies=[caller_dependency])
    def schedulers() -> Any:
        from contract.samplers import scheduler_catalogue

        return scheduler_catalogue()

    @router.get("/upscalers", response_model=list[UpscalerItem], dependencies=[caller_dependency])
    def upscalers() -> Any:
        return upscaler_list(context)

    @router.get(
        "/latent-upscale-modes", response_model=list[LatentUpscalerModeItem], dependencies=[caller_dependency]
    )
    def latent_upscale_modes() -> Any:
        from pipelines.generation.engine import LATENT_UPSCALE_MODES

        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @router.get("/sd-models", response_model=list[SDModelItem], dependencies=[caller_dependency])
    def sd_models() -> Any:
        """Checkpoints in models/Stable-diffusion (titles carry the hash once it is known)."""
        registry = services.registry
        items = []
        for entry in registry.checkpoints():
            short = registry.short_hash(entry)
            items.append(
                {
                    "title": entry.title(short),
                    "model_name": entry.name,
                    "hash": short,
                    "sha256": registry.hashes.cached(entry.path),
                    "filename": str(entry.path),
                    "config": str(entry.sidecar_yaml) if entry.sidecar_yaml else None,
                }
            )
        return items

    @router.get("/sd-vae", response_model=list[SDVaeItem], dependencies=[caller_dependency])
    def sd_vae() -> Any:
        return [{"model_name": e.filename, "filename": str(e.path)} for e in services.registry.list("vae")]

    @router.get("/hypernetworks", response_model=list[dict[str, Any]], dependencies=[caller_dependency])
    def hypernetworks() -> Any:
        """Hypernetworks are not supported: always empty."""
        return []

    @router.get("/face-restorers", response_model=list[FaceRestorerItem], dependencies=[caller_dependency])
    def face_restorers() -> Any:
        return face_restorer_list(context)

    @router.get("/loras", response_model=list[LoraItem], dependencies=[caller_dependency])
    def loras() -> Any:
        return lora_list(context)

    @router.get("/embeddings", response_model=EmbeddingsResponse, dependencies=[caller_dependency])
    def embeddings() -> Any:
        return embedding_list(context)

    @router.get("/prompt-styles", response_model=list[PromptStyleItem], dependencies=[caller_dependency])
    def prompt_styles() -> Any:
        """Saved styles (``styles.csv`` in the data folder, A1111's format)."""
        styles = services.styles.load().values()
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles]

    @router.get("/memory", response_model=MemoryResponse, dependencies=[caller_dependency])
    def memory() -> Any:
        return {"ram": ram_usage(), "cuda": cuda_usage()}

    @router.get("/scripts", response_model=ScriptsList, dependencies=[caller_dependency])
    def scripts() -> Any:
        """Scripts available: ControlNet."""
        # "controlnet m2m" is what webuiapi looks for to know the extension is there.
        names = [CONTROLNET_SCRIPT, "controlnet m2m"]
        return {"txt2img": names, "img2img": names}

    @router.get("/script-info", response_model=list[dict[str, Any]], dependencies=[caller_dependency])
    def script_info() -> Any:
        return []

    @router.post("/refresh-checkpoints", dependencies=[caller_dependency])
    def refresh_checkpoints() -> None:
        services.registry.refresh("checkpoint")

    @router.post("/refresh-vae", dependencies=[caller_dependency])
    def refresh_vae() -> None:
        services.registry.refresh("vae")

    @router.post("/refresh-loras", dependencies=[caller_dependency])
    def refresh_loras() -> None:
        services.registry.refresh("lora")

    @router.post("/unload-checkpoint", dependencies=[caller_dependency])
    def unload_checkpoint() -> Any:
        """Free the loaded checkpoints (a running job keeps its own until it finishes)."""
        services.workers.set_default_model(services.selected_checkpoint, load=False, unload=True)
        return {}

    @router.post("/reload-checkpoint", dependencies=[caller_dependency])
    def reload_checkpoint() -> Any:
        with context.device_exclusive():
            services.workers.set_default_model(services.selected_checkpoint, load=True)
        return {}

    return router


def _first_infotext(info: dict[str, Any] | None) -> str:
    texts = (info or {}).get("infotexts") or []
    return str(texts[0]) if texts else ""


# --- options and model switching ---------------------------------------------------------------
def current_options(context: ApiContext) -> dict[str, Any]:
    services = context.services
    registry = services.registry
    title: str | None = None
    sha256: str | None = None
    try:  # what the workers have loaded, else what the next job will load
        loaded = services.current_checkpoint()
        entry = (
            registry.find("checkpoint", loaded)
            if loaded
            else registry.default_checkpoint(services.selected_checkpoint)
        )
        title, sha256 = registry.title(entry), registry.hashes.cached(entry.path)
    except StudioError:
        title = None
    outputs = context.outputs_dir
    return {
        "sd_model_checkpoint": title,
        "sd_checkpoint_hash": sha256,
        "sd_vae": context.option_overrides.get("sd_vae", "Automatic"),
        "CLIP_stop_at_last_layers": context.option_overrides.get("CLIP_stop_at_last_layers", 1),
        "sd_checkpoints_limit": services.settings.checkpoints_in_ram,
        "samples_save": True,
        "samples_format": "png",
        "save_images_add_number": True,
        "grid_save": False,
        "enable_pnginfo": True,
        "jpeg_quality": 80,
        "outdir_samples": "",
        "outdir_txt2img_samples": str(outputs / "txt2img-images"),
        "outdir_img2img_samples": str(outputs / "img2img-images"),
        "outdir_extras_samples": str(outputs / "extras-images"),
        "outdir_grids": "",
        "outdir_txt2img_grids": str(outputs / "txt2img-grids"),
        "outdir_img2img_grids": str(outputs / "img2img-grids"),
        "live_previews_enable": True,
        "show_progress_type": "Approx cheap",
        "show_progress_every_n_steps": 1,
    }


def switch_checkpoint(context: ApiContext, name: str) -> None:
    """Load ``name`` and make it the model for jobs that name none, waiting for the running job
    to finish first (A1111 loads under its queue lock too)."""
    try:
        entry = context.find_checkpoint(name)
    except ModelNotFoundError as exc:
        raise HTTPException(status_code=400, detail=f"model {name!r} not found. {exc}") from None
    services = context.services
    with context.device_exclusive():
        errors = services.workers.set_default_model(entry.filename, load=True)
        if errors:
            services.workers.set_default_model(services.selected_checkpoint, load=False)
            raise HTTPException(status_code=400, detail=errors[0].partition(": ")[2])
        services.selected_checkpoint = entry.filename


# --- catalogues (other modules may not be there yet in a given build) ---------------------------
def upscaler_list(context: ApiContext) -> list[dict[str, Any]]:
    try:
        from pipelines.postprocess.upscalers import upscaler_catalogue
    except ImportError:
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
            for name in ("None", "Lanczos", "Nearest")
        ]
    return upscaler_catalogue(context.services.settings.models_dir)


def face_restorer_list(context: ApiContext) -> list[dict[str, Any]]:
    try:
        from pipelines.postprocess.face_restore import list_face_restorers
    except ImportError:
        return []
    return list_face_restorers(context.services.settings.models_dir)


def lora_list(context: ApiContext) -> list[dict[str, Any]]:
    try:
        from pipelines.prompts.extra_networks import list_loras
    except ImportError:
        return []
    return list_loras(context.services.registry.paths.folder("lora"))


def embedding_list(context: ApiContext) -> dict[str, Any]:
    try:
        from pipelines.prompts.extra_networks import list_embeddings
    except ImportError:
        return {"loaded": {}, "skipped": {}}
    family = next((s.current_family for s in context.services.workers.states() if s.current_family), None)
    width = {"sd1": 768, "sd2": 1024, "sdxl": 2048}.get(family or "")
    return list_embeddings(context.services.registry.paths.folder("embedding"), expected_width=width)


def ram_usage() -> dict[str, Any]:
    try:
        import psutil
    except ImportError:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        available = os.sysconf("SC_AVPHYS_PAGES") * page_size
        return {"free": available, "used": pages * page_size - available, "total": pages * page_size}
    memory = psutil.virtual_memory()
    return {"free": memory.available, "used": memory.total - memory.available, "total": memory.total}


def cuda_usage() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "CUDA is not available on this machine"}
    if not torch.cuda.is_initialized():
        # Asking would create a CUDA context (hundreds of MB on GPU 0) in a process that runs no
        # jobs: with worker processes each GPU's memory belongs to its worker.
        return {
            "error": "this process has not used the GPU: jobs run in worker processes "
            "(the Queue / Cluster tab shows each worker's GPU memory)"
        }
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()
    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": {
            "current": stats.get("active_bytes.all.current", 0),
            "peak": stats.get("active_bytes.all.peak", 0),
        },
        "allocated": {
            "current": stats.get("allocated_bytes.all.current", 0),
            "peak": stats.get("allocated_bytes.all.peak", 0),
        },
        "reserved": {
            "current": stats.get("reserved_bytes.all.current", 0),
            "peak": stats.get("reserved_bytes.all.peak", 0),
        },
        "inactive": {
            "current": stats.get("inactive_split_bytes.all.current", 0),
            "peak": stats.get("inactive_split_bytes.all.peak", 0),
        },
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
