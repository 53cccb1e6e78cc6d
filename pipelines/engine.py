"""The image engine: a request in, saved images out.

It composes the pieces (model manager, scheduler table, prompt encoding, noise, memory options,
outputs) around the stock diffusers pipelines. Every image is written to the outputs folder,
with A1111-style parameters embedded, before it is returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import GenerationInterruptedError, OutOfMemoryError
from pipelines.job_control import JobControl, ProgressCallback, ProgressEvent
from pipelines.requests import RANDOM_SEED, GenerationRequest, Txt2ImgRequest, random_seed

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.checkpoint_loader import LoadedCheckpoint
    from pipelines.memory import MemoryOptions
    from pipelines.model_manager import ModelManager

log = logging.getLogger(__name__)

ENGINE_VERSION = "sd-studio 0.1.0"


@dataclass(frozen=True)
class SavedImage:
    path: Path
    seed: int
    subseed: int
    infotext: str
    image: Image.Image = field(repr=False, compare=False)


@dataclass
class GenerationResult:
    images: list[SavedImage]
    request: GenerationRequest
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def info(self) -> dict[str, Any]:
        """A1111's ``info`` object (returned JSON-encoded by ``/sdapi/v1/txt2img``)."""
        req = self.request
        first = self.images[0] if self.images else None
        return {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(self.images),
            "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(self.images),
            "seed": first.seed if first else req.seed,
            "all_seeds": [img.seed for img in self.images],
            "subseed": first.subseed if first else req.subseed,
            "all_subseeds": [img.subseed for img in self.images],
            "subseed_strength": req.subseed_strength,
            "width": req.width,
            "height": req.height,
            "sampler_name": req.effective_sampler,
            "scheduler": req.scheduler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "batch_size": req.batch_size,
            "clip_skip": req.clip_skip,
            "infotexts": [img.infotext for img in self.images],
            "images": [str(img.path) for img in self.images],
            "interrupted": self.interrupted,
            "notes": self.notes,
            "version": ENGINE_VERSION,
        }


@dataclass
class EngineConfig:
    """How the engine runs; built by the app from settings and flags, then passed in."""

    outputs_root: Path
    memory_preset: str = "auto"
    memory_overrides: dict[str, Any] = field(default_factory=dict)
    oom_retry: bool = True


class ImageEngine:
    """Runs generation requests on one device. Not thread-safe per device: the job executor
    serialises jobs (one at a time per GPU)."""

    def __init__(self, models: ModelManager, config: EngineConfig) -> None:
        self.models = models
        self.config = config
        self._applied: dict[int, str] = {}  # id(pipe) -> preset applied to it

    # memory ---------------------------------------------------------------------------------
    def memory_options(self, preset: str | None = None, family: str = "sd1") -> tuple[str, MemoryOptions]:
        from pipelines.memory import MEMORY_PRESETS, preset_for_vram

        name = preset or self.config.memory_preset
        if name == "auto":
            name = preset_for_vram(_total_vram(), family)
        options = MEMORY_PRESETS[name]
        if self.config.memory_overrides:
            options = type(options).model_validate({**options.model_dump(), **self.config.memory_overrides})
        return name, options

    def _prepare(self, loaded: LoadedCheckpoint, preset: str | None, notes: list[str]) -> tuple[str, Any]:
        from pipelines.memory import apply_memory_options, resolve_device

        name, options = self.memory_options(preset, loaded.family.base)
        key = id(loaded.pipe)
        if self._applied.get(key) != name:
            device = resolve_device(options)
            lines = apply_memory_options(loaded.pipe, options, device)
            for line in lines:
                log.info("%s: %s", loaded.entry.filename, line)
            notes.append(f"memory preset: {name}")
            self._applied[key] = name
        return name, loaded.pipe

    # public ---------------------------------------------------------------------------------
    def run(
        self,
        request: GenerationRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        if isinstance(request, Txt2ImgRequest):
            return self.txt2img(request, control=control, on_progress=on_progress)
        raise TypeError(f"no engine mode for request type {type(request).__name__}")

    def txt2img(
        self,
        request: Txt2ImgRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        from pipelines.memory import free_accelerator_memory, is_out_of_memory, lower_memory_preset

        control = control or JobControl()
        started = time.perf_counter()
        seed = request.seed if request.seed != RANDOM_SEED else random_seed()
        subseed = request.subseed if request.subseed != RANDOM_SEED else random_seed()
        resolved = request.model_copy(update={"seed": seed, "subseed": subseed})
        notes: list[str] = []

        def status(message: str) -> None:
            if on_progress:
                on_progress(ProgressEvent(stage="loading", message=message))

        with self.models.use(resolved.checkpoint, status=status) as loaded:
            preset: str | None = None
            while True:
                try:
                    preset, _ = self._prepare(loaded, preset, notes)
                    images = self._sample_all(loaded, resolved, control, on_progress, notes)
                    break
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    free_accelerator_memory()
                    lower = lower_memory_preset(preset or "high") if self.config.oom_retry else None
                    if lower is None or any(n.startswith("out of memory") for n in notes):
                        raise OutOfMemoryError(
                            "The GPU ran out of memory even with the lowest-memory settings. Try a smaller "
                            "size or batch, or start with --lowvram."
                        ) from exc
                    notes.append(f"out of memory with preset '{preset}'; retrying once with '{lower}'")
                    log.warning(notes[-1])
                    preset = lower
        if on_progress:
            on_progress(ProgressEvent(stage="done", batch_count=resolved.n_iter, batch_index=resolved.n_iter))
        result = GenerationResult(
            images=images,
            request=resolved,
            notes=notes,
            interrupted=control.interrupted,
            seconds=time.perf_counter() - started,
        )
        if control.interrupted and not images:
            raise GenerationInterruptedError("Interrupted before any image was finished.")
        return result

    # internals ------------------------------------------------------------------------------
    def _sample_all(
        self,
        loaded: LoadedCheckpoint,
        request: Txt2ImgRequest,
        control: JobControl,
        on_progress: ProgressCallback | None,
        notes: list[str],
    ) -> list[SavedImage]:
        import torch

        from pipelines.noise import initial_noise
        from pipelines.outputs import dated_output_dir, save_image_atomically
        from pipelines.prompt_encoding import encode_prompts
        from pipelines.prompt_parser import strip_extra_networks
        from pipelines.samplers import build_scheduler

        # Jobs on one device run one at a time and the model is pinned, so the scheduler can be
        # swapped in place (cheaper than building a pipeline per job).
        pipe = loaded.pipe
        base_config = _base_scheduler_config(loaded)
        pipe.set_progress_bar_config(disable=True)
        batch = request.batch_size
        prompt, networks = strip_extra_networks(request.prompt)
        if networks:
            names = ", ".join(f"<{n.kind}:{n.name}>" for n in networks)
            notes.append(f"extra networks are not applied yet and were removed from the prompt: {names}")
        with torch.inference_mode():
            embeds = encode_prompts(
                pipe, [prompt] * batch, [request.negative_prompt] * batch, request.clip_skip
            )
        latent_channels = pipe.vae.config.latent_channels
        scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        shape = (latent_channels, request.height // scale, request.width // scale)
        out_dir = dated_output_dir(self.config.outputs_root, "txt2img", datetime.now())
        saved: list[SavedImage] = []
        for batch_index in range(request.n_iter):
            if control.interrupted:
                break
            control.clear_skip()
            seeds = [request.seed + batch_index * batch + i for i in range(batch)]
            subseeds = [request.subseed + batch_index * batch + i for i in range(batch)]
            noise = initial_noise(seeds, shape, subseeds=subseeds, subseed_strength=request.subseed_strength)
            pipe.scheduler = build_scheduler(
                request.effective_sampler, request.scheduler, dict(base_config), noise_seed=seeds[0]
            )
            latents = self._denoise(
                pipe, loaded, request, embeds, noise, seeds, batch_index, control, on_progress
            )
            if latents is None:
                continue
            if on_progress:
                on_progress(
                    ProgressEvent(
                        stage="decoding",
                        step=request.steps,
                        steps=request.steps,
                        batch_index=batch_index,
                        batch_count=request.n_iter,
                    )
                )
            images = decode_latents(pipe, latents, notes)
            for i, image in enumerate(images):
                infotext = build_request_infotext(request, loaded, seed=seeds[i], subseed=subseeds[i])
                path = save_image_atomically(image, out_dir, seed=seeds[i], infotext=infotext)
                saved.append(
                    SavedImage(path=path, seed=seeds[i], subseed=subseeds[i], infotext=infotext, image=image)
                )
        return saved

    def _denoise(
        self,
        pipe: Any,
        loaded: LoadedCheckpoint,
        request: Txt2ImgRequest,
        embeds: Any,
        noise: Any,
        seeds: list[int],
        batch_index: int,
        control: JobControl,
        on_progress: ProgressCallback | None,
    ) -> Any:
        import torch

        stopped = False

        def on_step_end(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            nonlocal stopped
            if on_progress:
                on_progress(
                    ProgressEvent(
                        stage="sampling",
                        step=step + 1,
                        steps=request.steps,
                        batch_index=batch_index,
                        batch_count=request.n_iter,
                        latents=tensors.get("latents"),
                    )
                )
            if control.should_stop_batch():
                stopped = True
                pipeline._interrupt = True
            return tensors

        device = pipe._execution_device
        dtype = pipe.unet.dtype
        kwargs: dict[str, Any] = {
            **embeds.as_pipeline_kwargs(),
            "num_inference_steps": request.steps,
            "guidance_scale": request.cfg_scale,
            "height": request.height,
            "width": request.width,
            "latents": noise.to(device=device, dtype=dtype),
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
            "output_type": "latent",
            "callback_on_step_end": on_step_end,
        }
        if request.eta is not None:
            kwargs["eta"] = request.eta
        if loaded.family.variant == "inpaint":
            kwargs.update(_blank_inpaint_inputs(request, len(seeds)))
        with torch.inference_mode():
            output = pipe(**kwargs)
        if stopped:
            return None
        return output.images


def _base_scheduler_config(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """The checkpoint's own scheduler config, remembered before any job swaps schedulers."""
    config = getattr(loaded, "_base_scheduler_config", None)
    if config is None:
        config = dict(loaded.pipe.scheduler.config)
        loaded._base_scheduler_config = config  # type: ignore[attr-defined]
    return config


def _blank_inpaint_inputs(request: GenerationRequest, count: int) -> dict[str, Any]:
    """txt2img with an inpainting checkpoint: the whole canvas is masked (A1111 does the same)."""
    from PIL import Image

    image = Image.new("RGB", (request.width, request.height), (127, 127, 127))
    mask = Image.new("L", (request.width, request.height), 255)
    return {"image": [image] * count, "mask_image": [mask] * count, "strength": 1.0}


def decode_latents(pipe: Any, latents: Any, notes: list[str]) -> list[Image.Image]:
    """VAE-decode, re-decoding in float32 if half precision produced NaNs (A1111's black images)."""
    import torch

    from pipelines.memory import decode_has_nan

    vae = pipe.vae
    config = vae.config

    def run(dtype: torch.dtype) -> torch.Tensor:
        scaled = latents.to(dtype)
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(scaled)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(scaled)
            scaled = scaled * std_t / config.scaling_factor + mean_t
        else:
            scaled = scaled / config.scaling_factor
        shift = getattr(config, "shift_factor", None)
        if shift:
            scaled = scaled + shift
        with torch.inference_mode():
            return vae.decode(scaled, return_dict=False)[0]

    half = vae.dtype in (torch.float16, torch.bfloat16)
    if half and getattr(config, "force_upcast", False):
        original = vae.dtype
        vae.to(torch.float32)
        try:
            image = run(torch.float32)
        finally:
            vae.to(original)
    else:
        image = run(vae.dtype)
        if half and decode_has_nan(image):
            notes.append(
                "VAE produced NaNs in half precision; decoded again in float32 (--no-half-vae avoids this)"
            )
            original = vae.dtype
            vae.to(torch.float32)
            try:
                image = run(torch.float32)
            finally:
                vae.to(original)
    return pipe.image_processor.postprocess(image, output_type="pil")


def build_request_infotext(
    request: GenerationRequest, loaded: LoadedCheckpoint, *, seed: int, subseed: int
) -> str:
    """A1111's parameters text for one image of this request."""
    from pipelines.infotext import build_infotext

    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": request.effective_sampler,
        "Schedule type": request.scheduler,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": loaded.short_hash,
        "Model": loaded.entry.name,
    }
    if request.subseed_strength > 0:
        params["Variation seed"] = subseed
        params["Variation seed strength"] = request.subseed_strength
    if request.clip_skip > 1:
        params["Clip skip"] = request.clip_skip
    if request.eta is not None:
        params["Eta"] = request.eta
    params["Version"] = ENGINE_VERSION
    return build_infotext(
        request.prompt, request.negative_prompt, {k: v for k, v in params.items() if v is not None}
    )


def _total_vram() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)
