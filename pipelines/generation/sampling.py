"""Running stock diffusers pipelines for a job: task pipelines, the denoising call, decoding.

Every task (txt2img, img2img, inpaint, each optionally with ControlNet) is a stock diffusers
pipeline class built with ``from_pipe`` from the loaded checkpoint, so they share weights.
Sampling always returns latents; decoding is ours so a half-precision VAE that produces NaNs
(A1111's black images) can be retried in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from pipelines.errors import StudioError
from pipelines.generation.memory import decode_has_nan
from pipelines.job_control import JobControl, ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.models.checkpoint_loader import LoadedCheckpoint

Task = Literal["txt2img", "img2img", "inpaint"]

_CLASS_NAMES: dict[tuple[bool, Task, bool], str] = {
    # (sdxl, task, controlnet) -> diffusers class name
    (False, "txt2img", False): "StableDiffusionPipeline",
    (False, "img2img", False): "StableDiffusionImg2ImgPipeline",
    (False, "inpaint", False): "StableDiffusionInpaintPipeline",
    (False, "txt2img", True): "StableDiffusionControlNetPipeline",
    (False, "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    (False, "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    (True, "txt2img", False): "StableDiffusionXLPipeline",
    (True, "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    (True, "inpaint", False): "StableDiffusionXLInpaintPipeline",
    (True, "txt2img", True): "StableDiffusionXLControlNetPipeline",
    (True, "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    (True, "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
}


def task_pipeline(loaded: LoadedCheckpoint, task: Task, *, controlnet: Any = None) -> Any:
    """The diffusers pipeline for ``task`` over the loaded checkpoint's components (cached).

    An inpainting checkpoint (9-channel UNet) runs every task through its inpainting pipeline,
    as A1111 does: txt2img and img2img simply mask the whole canvas.
    """
    import diffusers

    if loaded.family.variant == "edit":
        if task != "img2img" or controlnet is not None:
            raise StudioError(
                f"{loaded.entry.filename} is an instruct-pix2pix model: it edits an input image. "
                "Use img2img (without a mask or ControlNet), or pick another checkpoint."
            )
        loaded.pipe.set_progress_bar_config(disable=True)
        return loaded.pipe
    if loaded.family.variant == "inpaint":
        task = "inpaint"
    base_task: Task = task
    key = f"{base_task}:{id(controlnet) if controlnet is not None else ''}"
    cached = loaded.derived.get(key)
    if cached is not None:
        return cached
    cls_name = _CLASS_NAMES[(loaded.family.is_sdxl, base_task, controlnet is not None)]
    cls = getattr(diffusers, cls_name)
    if type(loaded.pipe) is cls and controlnet is None:
        pipe = loaded.pipe
    else:
        extra: dict[str, Any] = {"controlnet": controlnet} if controlnet is not None else {}
        pipe = cls.from_pipe(loaded.pipe, **extra)
    pipe.set_progress_bar_config(disable=True)
    if controlnet is None:
        loaded.derived[key] = pipe
    return pipe


def denoise(
    pipe: Any,
    kwargs: dict[str, Any],
    *,
    steps: int,
    batch_index: int,
    batch_count: int,
    control: JobControl,
    on_progress: ProgressCallback | None,
) -> Any:
    """Call the pipeline for latents, reporting each step and stopping within one step on
    interrupt/skip. Returns the latents, or None when the batch was skipped. On interrupt the
    latents as they stand are returned (diffusers skips the remaining steps), so the caller can
    keep the partly denoised picture; ``control.stopped_at`` records where it stopped."""
    import torch

    stopped = False

    def on_step_end(pipeline: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal stopped
        if stopped:
            return tensors
        if on_progress:
            on_progress(
                ProgressEvent(
                    stage="sampling",
                    step=step + 1,
                    steps=steps,
                    batch_index=batch_index,
                    batch_count=batch_count,
                    latents=tensors.get("latents"),
                )
            )
        if control.should_stop_batch():
            stopped = True
            pipeline._interrupt = True
            if control.interrupted and step + 1 < steps:
                control.stopped_at = (step + 1, steps)
        return tensors

    with torch.inference_mode():
        output = pipe(**kwargs, output_type="latent", callback_on_step_end=on_step_end)
    if stopped and not control.interrupted:
        return None
    return output.images


def decode_latents(pipe: Any, latents: Any, notes: list[str]) -> list[Image.Image]:
    """VAE-decode, re-decoding in float32 if half precision produced NaNs (A1111's black images)."""
    import torch

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
        image = _in_float32(vae, lambda: run(torch.float32))
    else:
        image = run(vae.dtype)
        if half and decode_has_nan(image):
            notes.append(
                "VAE produced NaNs in half precision; decoded again in float32 (--no-half-vae avoids this)"
            )
            image = _in_float32(vae, lambda: run(torch.float32))
    return pipe.image_processor.postprocess(image, output_type="pil")


def _in_float32(vae: Any, work: Callable[[], Any]) -> Any:
    import torch

    original = vae.dtype
    vae.to(torch.float32)
    try:
        return work()
    finally:
        vae.to(original)


def latent_shape(pipe: Any, width: int, height: int) -> tuple[int, int, int]:
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.vae.config.latent_channels, height // scale, width // scale


def encode_to_latents(pipe: Any, images: list[Image.Image], *, width: int, height: int) -> Any:
    """Each picture VAE-encoded at its own size, its latents bilinearly scaled to ``width`` x
    ``height`` (A1111's "Just resize (latent upscale)"), scaled as the pipeline's own encoder scales
    them, so diffusers' img2img takes the result as ready-made latents."""
    import torch

    vae = pipe.vae
    config = vae.config
    _, latent_h, latent_w = latent_shape(pipe, width, height)
    device = pipe._execution_device

    def run(dtype: torch.dtype) -> torch.Tensor:
        encoded = []
        for image in images:
            pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=dtype)
            with torch.inference_mode():
                latents = vae.encode(pixels).latent_dist.mode()
            encoded.append(
                torch.nn.functional.interpolate(latents.float(), size=(latent_h, latent_w), mode="bilinear")
            )
        return torch.cat(encoded)

    half = vae.dtype in (torch.float16, torch.bfloat16)
    if half and getattr(config, "force_upcast", False):
        latents = _in_float32(vae, lambda: run(torch.float32))
    else:
        latents = run(vae.dtype)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = (latents - mean_t) * config.scaling_factor / std_t
    else:
        latents = latents * config.scaling_factor
    return latents.to(dtype=pipe.unet.dtype)


@contextmanager
def seamless_tiling(modules: Iterable[Any], *, enabled: bool) -> Iterator[None]:
    """A1111's "Tiling": every 2-D convolution of ``modules`` (the UNet and the VAE) pads circularly
    for the job, so the picture wraps around at its edges; the padding is put back afterwards."""
    if not enabled:
        yield
        return
    import torch

    changed: list[tuple[Any, str]] = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.padding_mode != "circular":
                changed.append((layer, layer.padding_mode))
                layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in changed:
            layer.padding_mode = mode
