"""The image engine: a request in, saved images out.

It composes the pieces (model manager, scheduler table, prompt encoding, noise, memory options,
outputs) around the stock diffusers pipelines. Every image is written to the outputs folder,
with A1111-style parameters embedded, before it is returned.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.images import (
    RANDOM_SEED,
    ExtrasRequest,
    GenerationRequest,
    Img2ImgRequest,
    Txt2ImgRequest,
    random_seed,
)
from pipelines.errors import GenerationInterruptedError, OutOfMemoryError
from pipelines.generation.sampling import (
    decode_latents,
    denoise,
    latent_shape,
    seamless_tiling,
    task_pipeline,
)
from pipelines.job_control import JobControl, ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.generation.memory import MemoryOptions
    from pipelines.models.checkpoint_loader import LoadedCheckpoint
    from pipelines.models.model_manager import ModelManager
    from pipelines.outputs.saving import ImageSink
    from pipelines.postprocess.face_restore import FaceDetector
    from pipelines.postprocess.sd_upscaler import SdUpscalerCache, SdUpscaleSettings, SdX4Upscaler

log = logging.getLogger(__name__)

ENGINE_VERSION = "sd-studio 0.1.0"
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@dataclass(frozen=True)
class SavedImage:
    ref: str
    """Where the image went: a file path, or an artifact ref when it travels to the head first."""
    seed: int
    subseed: int
    infotext: str
    image: Image.Image = field(repr=False, compare=False)

    @property
    def path(self) -> Path:
        return Path(self.ref)


@dataclass
class GenerationResult:
    images: list[SavedImage]
    request: Any
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    model_name: str | None = None
    model_hash: str | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    extra_generation_params: dict[str, Any] = field(default_factory=dict)
    inpainting_conditioning: bool = False
    """The checkpoint is an inpainting model (9-channel UNet), so the mask and masked image condition it."""

    def info(self) -> dict[str, Any]:
        """A1111's ``info`` object (returned JSON-encoded by ``/sdapi/v1/txt2img``), with the keys and
        value types of A1111 1.10's ``Processed.js()``."""
        req = self.request
        first = self.images[0] if self.images else None
        extra = {
            str(key): value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
            for key, value in self.extra_generation_params.items()
        }
        info: dict[str, Any] = {
            "index_of_first_image": 0,  # no grid is ever put before the images
            "sd_model_name": self.model_name,
            "sd_model_hash": self.model_hash,
            "sd_vae_name": self.vae_name,
            "sd_vae_hash": self.vae_hash,
            "extra_generation_params": extra,
            "is_using_inpainting_conditioning": self.inpainting_conditioning,
            "all_seeds": [img.seed for img in self.images],
            "all_subseeds": [img.subseed for img in self.images],
            "infotexts": [img.infotext for img in self.images],
            "images": [img.ref for img in self.images],
            "interrupted": self.interrupted,
            "notes": self.notes,
            "version": ENGINE_VERSION,
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        }
        if isinstance(req, GenerationRequest):
            info.update(
                prompt=req.prompt,
                all_prompts=[req.prompt] * len(self.images),
                negative_prompt=req.negative_prompt,
                all_negative_prompts=[req.negative_prompt] * len(self.images),
                seed=first.seed if first else req.seed,
                subseed=first.subseed if first else req.subseed,
                subseed_strength=req.subseed_strength,
                width=req.width,
                height=req.height,
                sampler_name=req.effective_sampler,
                scheduler=req.scheduler,
                cfg_scale=req.cfg_scale,
                steps=req.steps,
                batch_size=req.batch_size,
                clip_skip=req.clip_skip,
                denoising_strength=getattr(req, "denoising_strength", None),
                styles=list(req.styles),
                restore_faces=req.restore_faces,
                face_restoration_model=req.face_restoration_model if req.restore_faces else None,
                seed_resize_from_w=req.seed_resize_from_w,
                seed_resize_from_h=req.seed_resize_from_h,
            )
        return info


@dataclass
class EngineConfig:
    """How the engine runs; built by the app from settings and flags, then passed in."""

    outputs_root: Path
    memory_preset: str = "auto"
    memory_overrides: dict[str, Any] = field(default_factory=dict)
    oom_retry: bool = True
    models_root: Path | None = None
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    vae_dir: Path | None = None
    image_sink: ImageSink | None = None
    """Where finished images go; ``None``: saved under ``outputs_root`` (a worker passes a sink
    that sends them to the head instead)."""
    speed_defaults: dict[str, Any] = field(default_factory=dict)
    """The studio's per-job speed options (``cache_interval``, ``token_merging_ratio``,
    ``fast_decode``) for jobs that set none."""
    face_detector: Callable[[], FaceDetector | None] | None = None
    """Gives the face detector for face restoration (None: OpenCV Haar); the app builds RetinaFace
    when its weights are installed. Called per job, so a newly dropped-in file is picked up."""


@dataclass
class _Job:
    """Per-job state shared by the mode implementations."""

    request: Any
    loaded: LoadedCheckpoint
    control: JobControl
    on_progress: ProgressCallback | None
    notes: list[str]
    extra_infotext: dict[str, object] = field(default_factory=dict)
    speed: Any = None
    """This job's ``JobSpeedups`` (step caching, token merging, fast decode)."""
    saved: list[SavedImage] = field(default_factory=list)
    """Images saved so far; an out-of-memory retry keeps them and redoes only unfinished batches."""
    finished_batches: set[int] = field(default_factory=set)


class ImageEngine:
    """Runs generation requests on one device. Not thread-safe per device: the job executor
    serialises jobs (one at a time per GPU)."""

    def __init__(self, models: ModelManager, config: EngineConfig) -> None:
        self.models = models
        self.config = config
        # pipeline -> preset applied to it; weak so an unloaded pipeline's entry cannot be mistaken
        # for a new pipeline that happens to reuse its id()
        self._applied: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        # pipeline -> the lower preset an out-of-memory retry finished with: later jobs start there
        # instead of running out of memory (and re-placing the model) every time
        self._fell_back_to: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._upscaler_cache: Any = None
        self._sd_upscaler_cache: Any = None
        self._vae_cache: Any = None
        self._controlnets: Any = None
        self._annotator_cache: Any = None
        self._lora_hashes: dict[Any, str] = {}
        self._fast_decoders: Any = None

    @property
    def upscaler_cache(self) -> Any:
        """Loaded upscaler / face-restore networks (created on first use)."""
        if self._upscaler_cache is None:
            from pipelines.postprocess.upscalers import UpscalerCache

            self._upscaler_cache = UpscalerCache()
        return self._upscaler_cache

    @property
    def sd_upscaler_cache(self) -> SdUpscalerCache:
        """The loaded Stable Diffusion x4 upscaler pipeline, one at a time (created on first use)."""
        if self._sd_upscaler_cache is None:
            from pipelines.postprocess.sd_upscaler import SdUpscalerCache

            self._sd_upscaler_cache = SdUpscalerCache()
        return self._sd_upscaler_cache

    def _sd_x4_upscaler(self, settings: SdUpscaleSettings | None = None) -> SdX4Upscaler:
        """What ``upscale`` runs an ``SD x4 (...)`` upscaler with: the engine's cache and memory
        options (sized like an SD2 model) plus this job's settings (defaults when None)."""
        from pipelines.postprocess.sd_upscaler import SdX4Upscaler

        return SdX4Upscaler(
            self.sd_upscaler_cache, settings=settings, memory=self.memory_options(None, "sd2")[1]
        )

    @property
    def annotator_cache(self) -> Any:
        """Loaded ControlNet preprocessor networks (depth, pose, edges...), created on first use."""
        if self._annotator_cache is None:
            from pipelines.controlnet.annotators import AnnotatorCache

            self._annotator_cache = AnnotatorCache()
        return self._annotator_cache

    # memory ---------------------------------------------------------------------------------
    def memory_options(self, preset: str | None = None, family: str = "sd1") -> tuple[str, MemoryOptions]:
        from pipelines.generation.memory import MEMORY_PRESETS, preset_for_vram

        name = preset or self.config.memory_preset
        if name == "auto":
            name = preset_for_vram(_total_vram(str(self.config.memory_overrides.get("device") or "")), family)
        options = MEMORY_PRESETS[name]
        if self.config.memory_overrides:
            options = type(options).model_validate({**options.model_dump(), **self.config.memory_overrides})
        return name, options

    def _prepare_pipe(
        self, pipe: Any, family: str, preset: str | None, notes: list[str], speed: Any = None
    ) -> None:
        """Apply the memory preset to ``pipe`` once (again when the preset changes: the OOM retry);
        the job's speed options (``speed``) are taken off meanwhile so they wrap what it installs."""
        from pipelines.generation.memory import apply_memory_options, resolve_device

        name, options = self.memory_options(preset, family)
        key = pipe
        if self._applied.get(key) != name:
            unet = getattr(pipe, "unet", None)
            with speed.detached(unet) if speed is not None and unet is not None else nullcontext():
                for line in apply_memory_options(pipe, options, resolve_device(options)):
                    log.info("%s", line)
            if not any(n.startswith("memory preset") for n in notes):
                notes.append(f"memory preset: {name}")
            self._applied[key] = name

    # public ---------------------------------------------------------------------------------
    def run(
        self,
        request: Any,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        if isinstance(request, Txt2ImgRequest):
            return self._generate(request, self._txt2img, control, on_progress)
        if isinstance(request, Img2ImgRequest):
            return self._generate(request, self._img2img, control, on_progress)
        if isinstance(request, ExtrasRequest):
            return self.extras(request, control=control, on_progress=on_progress)
        raise TypeError(f"no engine mode for request type {type(request).__name__}")

    def txt2img(self, request: Txt2ImgRequest, **kwargs: Any) -> GenerationResult:
        return self._generate(request, self._txt2img, kwargs.get("control"), kwargs.get("on_progress"))

    def img2img(self, request: Img2ImgRequest, **kwargs: Any) -> GenerationResult:
        return self._generate(request, self._img2img, kwargs.get("control"), kwargs.get("on_progress"))

    # the common frame of every image job ------------------------------------------------------
    def _generate(
        self, request: Any, mode: Any, control: JobControl | None, on_progress: ProgressCallback | None
    ) -> GenerationResult:
        from pipelines.generation.memory import free_accelerator_memory, is_out_of_memory, lower_memory_preset

        control = control or JobControl()
        started = time.perf_counter()
        seed = request.seed if request.seed != RANDOM_SEED else random_seed()
        subseed = request.subseed if request.subseed != RANDOM_SEED else random_seed()
        request = request.model_copy(update={"seed": seed, "subseed": subseed})
        notes: list[str] = []

        def status(message: str) -> None:
            if on_progress:
                on_progress(ProgressEvent(stage="loading", message=message))

        # A1111: a per-job model choice is temporary unless override_settings_restore_afterwards=False
        restore = bool(request.checkpoint) and request.override_settings_restore_afterwards
        with (
            self.models.use(request.checkpoint, status=status, restore_current=restore) as loaded,
            self._vae_for(request, loaded) as vae,
        ):
            job = _Job(request=request, loaded=loaded, control=control, on_progress=on_progress, notes=notes)
            if vae is not None:
                job.extra_infotext.update({"VAE hash": vae[1], "VAE": vae[0]})
            if request.tiling:
                job.extra_infotext["Tiling"] = True
            job.speed = self._speedups(request, loaded)
            job.extra_infotext.update(job.speed.infotext())
            preset: str | None = self._fell_back_to.get(loaded.pipe)
            if preset is not None:
                notes.append(
                    f"memory preset: {preset} (an earlier job ran out of memory with the configured "
                    "preset; reload the model to try it again)"
                )
            while True:
                try:
                    with (
                        seamless_tiling([loaded.pipe.unet, loaded.pipe.vae], enabled=bool(request.tiling)),
                        job.speed.attached(loaded.pipe.unet),
                    ):
                        images = mode(job, preset)
                    notes.extend(job.speed.notes())
                    if preset is not None:
                        self._fell_back_to[loaded.pipe] = preset
                    break
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    free_accelerator_memory()
                    current = preset or self.memory_options(None, loaded.family.base)[0]
                    lower = lower_memory_preset(current) if self.config.oom_retry else None
                    if lower is None or any(n.startswith("out of memory") for n in notes):
                        raise OutOfMemoryError(
                            "The GPU ran out of memory even with the lowest-memory settings. Try a smaller "
                            "size or batch, or start with --lowvram."
                        ) from exc
                    notes.append(f"out of memory with preset '{current}'; retrying once with '{lower}'")
                    log.warning(notes[-1])
                    preset = lower
        if on_progress:
            on_progress(ProgressEvent(stage="done", batch_count=request.n_iter, batch_index=request.n_iter))
        result = GenerationResult(
            images=images,
            request=request,
            notes=notes,
            interrupted=control.interrupted,
            seconds=time.perf_counter() - started,
            model_name=loaded.entry.name,
            model_hash=loaded.short_hash,
            vae_name=vae[0] if vae else None,
            vae_hash=(vae[1] or None) if vae else None,
            extra_generation_params=dict(job.extra_infotext),
            inpainting_conditioning=loaded.family.variant == "inpaint",
        )
        if control.interrupted and not images:
            raise GenerationInterruptedError("Interrupted before any image was finished.")
        return result

    def _speedups(self, request: GenerationRequest, loaded: LoadedCheckpoint) -> Any:
        """This job's speed options: its own, else the studio's defaults (``EngineConfig``)."""
        from pipelines.generation.memory import (
            compile_refusal,
            resolve_device,
            unet_compiled,
            unet_weights_in_fp8,
        )
        from pipelines.generation.speedups import JobSpeedups, SpeedOptions

        chosen = {**self.config.speed_defaults, **request.speed_settings()}
        options = SpeedOptions(
            cache_interval=int(chosen.get("cache_interval") or 1),
            token_merging_ratio=float(chosen.get("token_merging_ratio") or 0.0),
            fast_decode=bool(chosen.get("fast_decode")),
        )
        memory = self.memory_options(None, loaded.family.base)[1]
        unet = loaded.pipe.unet
        compiled = unet_compiled(unet) or (
            compile_refusal(memory, resolve_device(memory).type == "cuda", unet) is None
        )
        refused = None
        if compiled and (options.cache_interval > 1 or options.token_merging_ratio > 0):
            # CUDA graphs overwrite their outputs at each replay: kept deep features would be lost
            refused = "step caching and token merging: not applied (the UNet is compiled with CUDA graphs)"
            options = SpeedOptions(fast_decode=options.fast_decode)
        speed = JobSpeedups(options)
        if refused:
            speed.extra_notes.append(refused)
        fp8_setting = memory.fp8_unet
        if fp8_setting or unet_weights_in_fp8(loaded.pipe.unet):
            speed.extra_infotext["UNet weights"] = "fp8 e4m3fn"
        return speed

    def _decode_final(self, job: _Job, pipe: Any, latents: Any) -> list[Image.Image]:
        """The last decode of a job: TAESD with ``fast_decode`` (when its weights are present), else
        the pipeline's VAE."""
        speed = job.speed
        if speed is None or not speed.options.fast_decode:
            return decode_latents(pipe, latents, job.notes)
        from pipelines.generation.previews import LatentPreviewer
        from pipelines.generation.speedups import decode_with_taesd

        if self._fast_decoders is None:
            self._fast_decoders = LatentPreviewer(self.models.registry.paths.folder("vae_approx"))
        sdxl = job.loaded.family.is_sdxl
        decoder = self._fast_decoders.taesd_decoder(sdxl=sdxl)
        if decoder is None:
            from installer.launch_command import launch_command

            note = (
                f"fast_decode: no {'TAESDXL' if sdxl else 'TAESD'} weights in "
                f"{self._fast_decoders.vae_approx_dir}; decoded with the full VAE "
                f"({launch_command('download madebyollin/taesd --kind VAE-approx')})"
            )
            if note not in job.notes:
                job.notes.append(note)
            return decode_latents(pipe, latents, job.notes)
        job.extra_infotext["VAE decode"] = "TAESDXL" if sdxl else "TAESD"
        return decode_with_taesd(pipe, decoder, latents)

    @contextmanager
    def _vae_for(
        self, request: GenerationRequest, loaded: LoadedCheckpoint
    ) -> Iterator[tuple[str, str] | None]:
        """Swap in the VAE the request names (``override_settings.sd_vae``) for this job."""
        from pipelines.models.vae_loader import AUTOMATIC, VaeCache, vae_swapped

        name = request.vae
        if name is None or name in AUTOMATIC:
            yield None
            return
        registry = self.models.registry
        entry = registry.find("vae", name)
        if self._vae_cache is None:
            self._vae_cache = VaeCache()
        vae = self._vae_cache.get(entry, loaded.pipe.vae)
        with vae_swapped(loaded, vae):
            yield entry.filename, registry.short_hash(entry, compute=True) or ""

    @contextmanager
    def _prompt_conditioning(self, job: _Job, pipe: Any) -> Iterator[Any]:
        """Apply the prompt's LoRAs and embeddings, encode the prompts (A1111 emphasis, long prompts)
        for this job's batch, and take the networks off again when the job ends."""
        import torch

        from pipelines.prompts.encoding import encode_prompts
        from pipelines.prompts.extra_networks import (
            LORA_HASHES_KEY,
            apply_loras,
            load_embeddings_for_prompt,
            lora_hashes,
            remove_loras,
            unload_embeddings,
        )
        from pipelines.prompts.parser import strip_extra_networks

        request = job.request
        prompt, networks = strip_extra_networks(request.prompt)
        negative, negative_networks = strip_extra_networks(request.negative_prompt)
        base = job.loaded.pipe
        paths = self.models.registry.paths
        applied = apply_loras(
            base,
            [*networks, *negative_networks],
            lora_dir=paths.folder("lora"),
            family=job.loaded.family,
            hash_cache=self._lora_hashes,
        )
        tokens: list[str] = []
        try:
            job.notes.extend(applied.notes)
            hashes = lora_hashes(applied)
            if hashes:
                job.extra_infotext[LORA_HASHES_KEY] = hashes
            tokens = load_embeddings_for_prompt(
                base, prompt, negative, paths.folder("embedding"), notes=job.notes
            )
            batch = request.batch_size
            with torch.inference_mode():
                embeds = encode_prompts(pipe, [prompt] * batch, [negative] * batch, request.clip_skip)
            yield embeds
        finally:
            unload_embeddings(base, tokens)
            remove_loras(base, applied)

    def _control(
        self,
        job: _Job,
        pipe: Any,
        mode: str,
        width: int,
        height: int,
        fallback: Any = None,
        *,
        hires_pass: bool = False,
    ) -> Any:
        """ControlNet inputs for the request's enabled units of this pass (first or hires), or None."""
        hires_enabled = bool(getattr(job.request, "enable_hr", False))
        units = [
            unit
            for unit in getattr(job.request, "controlnet_units", [])
            if unit.applies_to_pass(hires_pass, hires_enabled=hires_enabled)
        ]
        if not units:
            return None
        from pipelines.controlnet.apply import prepare_control_inputs
        from pipelines.controlnet.model_files import ControlNetCache
        from pipelines.controlnet.preprocessors import default_annotator_dirs

        if self._controlnets is None:
            self._controlnets = ControlNetCache(self.models.registry.paths.folder("controlnet"))
        control = prepare_control_inputs(
            units,
            self._controlnets,
            width=width,
            height=height,
            family=job.loaded.family,
            annotator_dir=default_annotator_dirs(self._models_root()),
            fallback_image=fallback,
            device=pipe._execution_device,
            dtype=pipe.unet.dtype,
            classifier_free_guidance=job.request.cfg_scale > 1,
            annotators=self.annotator_cache,
        )
        if control is not None:
            for index, unit in enumerate(units):
                text = (
                    f"Module: {unit.module}, Model: {unit.model}, Weight: {unit.weight}, "
                    f"Guidance Start: {unit.guidance_start}, Guidance End: {unit.guidance_end}"
                )
                if hires_enabled:
                    text += f", Hr Option: {unit.hr_option}"
                job.extra_infotext[f"ControlNet {index}"] = text
        return control

    def _with_control(self, job: _Job, pipe: Any, control: Any, mode: str, preset: str | None) -> Any:
        if control is None:
            return pipe
        from pipelines.controlnet.apply import build_controlnet_pipeline

        runner = build_controlnet_pipeline(pipe, control.controlnet, mode=mode)
        runner.set_progress_bar_config(disable=True)
        self._prepare_pipe(runner, job.loaded.family.base, preset, job.notes, job.speed)
        return runner

    def _post_upscale(self, job: _Job, images: list[Image.Image]) -> list[Image.Image]:
        """img2img's optional upscale of each finished image (``upscaler``/``upscale_by``), the way
        Extras upscales; recorded with A1111's Extras infotext keys."""
        request = job.request
        name = getattr(request, "upscaler", None)
        factor = float(getattr(request, "upscale_by", 1.0) or 1.0)
        if not name or name == "None" or factor <= 1:
            return images
        upscaled = [
            self._upscale(image, name, round(image.width * factor), round(image.height * factor))
            for image in images
        ]
        job.extra_infotext["Postprocess upscaler"] = name
        job.extra_infotext["Postprocess upscale by"] = f"{factor:g}"
        return upscaled

    def _restore_faces(self, job: _Job, images: list[Image.Image]) -> list[Image.Image]:
        """A1111's "Restore faces" on freshly generated images (before an inpaint is pasted back,
        so pixels outside the mask stay the input's)."""
        request = job.request
        if not request.restore_faces:
            return images
        from pipelines.postprocess.face_restore import restore_faces

        model = request.face_restoration_model
        detector = self.config.face_detector() if self.config.face_detector else None
        restored = []
        for image in images:
            result = restore_faces(
                image,
                model=model,
                cache=self.upscaler_cache,
                models_root=self._models_root(),
                detector=detector,
            )
            job.notes.extend(message for message in result.messages if message not in job.notes)
            restored.append(result.image)
        job.extra_infotext["Face restoration"] = model
        return restored

    def _save(
        self,
        job: _Job,
        image: Image.Image,
        seed: int,
        subseed: int,
        folder: str,
        size: tuple[int, int] | None = None,
    ) -> SavedImage:
        infotext = build_request_infotext(
            job.request, job.loaded, seed=seed, subseed=subseed, extra=job.extra_infotext, size=size
        )
        ref = self.image_sink.save_image(image, folder=folder, seed=seed, infotext=infotext)
        if job.on_progress:
            job.on_progress(ProgressEvent(stage="saved", message=ref))
        return SavedImage(ref=ref, seed=seed, subseed=subseed, infotext=infotext, image=image)

    @property
    def image_sink(self) -> ImageSink:
        from pipelines.outputs.saving import DiskImageSink

        return self.config.image_sink or DiskImageSink(self.config.outputs_root)

    def _batches(self, job: _Job) -> Iterator[tuple[int, list[int], list[int]]]:
        request = job.request
        first = True
        for batch_index in range(request.n_iter):
            if job.control.interrupted:
                return
            if batch_index in job.finished_batches:
                continue
            # A Skip that arrived before the first batch began (the model still loading, or a batch
            # of a job spread over workers not started yet) skips that batch; later ones only
            # forget the Skip the previous batch consumed.
            if not first:
                job.control.clear_skip()
            first = False
            size = request.batch_size
            seeds = [request.seed + batch_index * size + i for i in range(size)]
            subseeds = [request.subseed + batch_index * size + i for i in range(size)]
            yield batch_index, seeds, subseeds

    def _scheduler(self, job: _Job, pipe: Any, seeds: list[int]) -> None:
        from pipelines.generation.samplers import build_scheduler

        request = job.request
        if job.speed is not None:
            job.speed.new_run()
        pipe.scheduler = build_scheduler(
            request.effective_sampler,
            request.scheduler,
            dict(job.loaded.scheduler_config),
            noise_seed=seeds[0],
        )

    def _decoding(self, job: _Job, batch_index: int) -> None:
        if job.on_progress:
            steps = job.request.steps
            job.on_progress(
                ProgressEvent(
                    stage="decoding",
                    step=steps,
                    steps=steps,
                    batch_index=batch_index,
                    batch_count=job.request.n_iter,
                )
            )

    # txt2img --------------------------------------------------------------------------------
    def _txt2img(self, job: _Job, preset: str | None, folder: str = "txt2img") -> list[SavedImage]:
        import torch

        from pipelines.generation.noise import initial_noise

        request: Txt2ImgRequest = job.request
        pipe = task_pipeline(job.loaded, "txt2img")
        self._prepare_pipe(pipe, job.loaded.family.base, preset, job.notes, job.speed)
        saved = job.saved
        with self._prompt_conditioning(job, pipe) as embeds:
            task = "inpaint" if job.loaded.family.variant == "inpaint" else "txt2img"
            control = self._control(job, pipe, task, request.width, request.height)
            runner = self._with_control(job, pipe, control, task, preset)
            for batch_index, seeds, subseeds in self._batches(job):
                self._scheduler(job, runner, seeds)
                noise = initial_noise(
                    seeds,
                    latent_shape(pipe, request.width, request.height),
                    subseeds=subseeds,
                    subseed_strength=request.subseed_strength,
                )
                kwargs: dict[str, Any] = {
                    **embeds.as_pipeline_kwargs(),
                    "num_inference_steps": request.steps,
                    "guidance_scale": request.cfg_scale,
                    "height": request.height,
                    "width": request.width,
                    "latents": noise.to(device=pipe._execution_device, dtype=pipe.unet.dtype),
                    "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
                }
                if request.eta is not None:
                    kwargs["eta"] = request.eta
                if job.loaded.family.variant == "inpaint":
                    kwargs.update(_blank_inpaint_inputs(request.width, request.height, len(seeds)))
                if control is not None:
                    kwargs.update(control.pipeline_kwargs(task))
                latents = denoise(
                    runner,
                    kwargs,
                    steps=request.steps,
                    batch_index=batch_index,
                    batch_count=request.n_iter,
                    control=job.control,
                    on_progress=job.on_progress,
                )
                if latents is None:
                    continue
                _mark_interrupted(job)
                if getattr(request, "enable_hr", False) and not job.control.interrupted:
                    images = self._hires_pass(job, pipe, embeds, latents, seeds, batch_index, preset)
                    if images is None:
                        continue
                else:
                    if getattr(request, "enable_hr", False):
                        job.extra_infotext.setdefault("Interrupted", "before the hires fix")
                    self._decoding(job, batch_index)
                    images = self._decode_final(job, pipe, latents)
                images = self._restore_faces(job, images)
                for i, image in enumerate(images):
                    saved.append(self._save(job, image, seeds[i], subseeds[i], folder))
                job.finished_batches.add(batch_index)
        return saved

    def _hires_pass(
        self,
        job: _Job,
        pipe: Any,
        embeds: Any,
        latents: Any,
        seeds: list[int],
        batch_index: int,
        preset: str | None,
    ) -> list[Image.Image] | None:
        """A1111's hires fix: upscale the first pass (in latent space or as an image) and run an
        img2img pass at the target size."""
        import torch

        request: Txt2ImgRequest = job.request
        target_w, target_h = hires_size(request)
        strength = request.denoising_strength if request.denoising_strength is not None else 0.7
        steps = request.hr_second_pass_steps or request.steps
        upscaler = request.hr_upscaler or "Latent"
        job.extra_infotext.update(
            {
                "Denoising strength": strength,
                "Hires upscale": request.hr_scale
                if not (request.hr_resize_x or request.hr_resize_y)
                else None,
                "Hires resize": f"{target_w}x{target_h}"
                if (request.hr_resize_x or request.hr_resize_y)
                else None,
                "Hires steps": request.hr_second_pass_steps or None,
                "Hires upscaler": upscaler,
            }
        )
        if upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[upscaler]
            scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
            init: Any = torch.nn.functional.interpolate(
                latents, size=(target_h // scale, target_w // scale), mode=mode, antialias=antialias
            )
        else:
            self._decoding(job, batch_index)
            first = decode_latents(pipe, latents, job.notes)
            init = [
                self._upscale(image, upscaler, target_w, target_h, sd_settings=_sd_x4_settings(request, seed))
                for image, seed in zip(first, seeds, strict=True)
            ]
        second = task_pipeline(job.loaded, "img2img")
        self._prepare_pipe(second, job.loaded.family.base, preset, job.notes, job.speed)
        if strength <= 0:
            return init if not hasattr(init, "shape") else decode_latents(second, init, job.notes)
        task = "inpaint" if job.loaded.family.variant == "inpaint" else "img2img"
        control = self._control(job, second, task, target_w, target_h, hires_pass=True)
        runner = self._with_control(job, second, control, task, preset)
        self._scheduler(job, runner, seeds)
        steps = img2img_call_steps(steps, strength)
        kwargs: dict[str, Any] = {
            **embeds.as_pipeline_kwargs(),
            "image": init,
            "strength": strength,
            "num_inference_steps": steps,
            "guidance_scale": request.cfg_scale,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        }
        if job.loaded.family.variant == "inpaint":
            kwargs.update(_blank_inpaint_inputs(target_w, target_h, len(seeds)))
            kwargs["height"], kwargs["width"] = target_h, target_w
        if control is not None:
            kwargs.update(control.pipeline_kwargs(task))
        result = denoise(
            runner,
            kwargs,
            steps=max(1, int(steps * strength)),
            batch_index=batch_index,
            batch_count=request.n_iter,
            control=job.control,
            on_progress=job.on_progress,
        )
        if result is None:
            return None
        _mark_interrupted(job, "hires ")
        self._decoding(job, batch_index)
        return self._decode_final(job, second, result)

    def _upscale(
        self,
        image: Image.Image,
        upscaler: str,
        width: int,
        height: int,
        *,
        sd_settings: SdUpscaleSettings | None = None,
    ) -> Image.Image:
        """Hires fix's image upscale; ``sd_settings`` (prompt, seed...) for an SD x4 upscaler."""
        from PIL import Image as PILImage

        if upscaler in ("None", "Lanczos"):
            return image.resize((width, height), PILImage.Resampling.LANCZOS)
        if upscaler == "Nearest":
            return image.resize((width, height), PILImage.Resampling.NEAREST)
        from pipelines.postprocess.upscalers import upscale

        return upscale(
            image,
            upscaler=upscaler,
            target_size=(width, height),
            crop=False,
            cache=self.upscaler_cache,
            models_root=self._models_root(),
            sd_upscaler=self._sd_x4_upscaler(sd_settings),
        )

    def _models_root(self) -> Path:
        return self.config.models_root or self.models.registry.paths.models_root

    # img2img / inpaint / outpaint -------------------------------------------------------------
    def _img2img(self, job: _Job, preset: str | None) -> list[SavedImage]:
        import torch

        from pipelines.generation.inpaint_plan import fill_name, plan_source

        request: Img2ImgRequest = job.request
        strength = request.denoising_strength
        job.extra_infotext["Denoising strength"] = strength
        if request.mask or request.outpainting:
            job.extra_infotext["Mask blur"] = request.mask_blur_x
            if request.mask and not request.outpainting:
                job.extra_infotext["Masked content"] = fill_name(request.inpainting_fill)
                if request.inpaint_full_res:
                    job.extra_infotext["Inpaint area"] = "Only masked"
                    job.extra_infotext["Masked area padding"] = request.inpaint_full_res_padding
        if (
            strength >= 1
            and not (request.mask or request.outpainting)
            and job.loaded.family.variant == "normal"
        ):
            # Full strength discards the input: sample from the seed's noise exactly as txt2img does.
            return self._txt2img(job, preset, folder="img2img")
        if request.subseed_strength > 0 and job.loaded.family.variant == "edit":
            job.notes.append("variation seeds do not apply to instruct-pix2pix models; only the seed is used")
        saved = job.saved
        with self._prompt_conditioning(job, job.loaded.pipe) as embeds:
            for batch_index, seeds, subseeds in self._batches(job):
                plans = [
                    plan_source(request, batch_index * len(seeds) + i, seed=s) for i, s in enumerate(seeds)
                ]
                for plan in plans:
                    job.notes.extend(n for n in plan.notes if n not in job.notes)
                no_op = strength <= 0 and job.loaded.family.variant != "edit"
                if all(p.empty_mask for p in plans) or no_op:
                    results = [_unchanged_result(p) for p in plans]
                else:
                    results = self._img2img_batch(
                        job, plans, embeds, seeds, subseeds, batch_index, preset, torch
                    )
                    if results is None:
                        continue
                results = self._post_upscale(job, results)
                for i, image in enumerate(results):
                    # The size img2img really worked at (an outpainted canvas, an untouched picture),
                    # so that sending the infotext back reuses it; "only masked" keeps the crop's size.
                    size = plans[i].size
                    saved.append(self._save(job, image, seeds[i], subseeds[i], "img2img", size=size))
                job.finished_batches.add(batch_index)
        return saved

    def _img2img_batch(
        self,
        job: _Job,
        plans: list[Any],
        embeds: Any,
        seeds: list[int],
        subseeds: list[int],
        batch_index: int,
        preset: str | None,
        torch: Any,
    ) -> list[Image.Image] | None:
        from pipelines.generation.noise import initial_noise, variation_noise
        from pipelines.generation.sampling import encode_to_latents, latent_shape

        request: Img2ImgRequest = job.request
        inpaint = plans[0].is_inpaint
        width, height = plans[0].size
        if len({p.size for p in plans}) > 1:
            raise ValueError("init_images: all images of one batch must give the same processing size")
        task = "inpaint" if inpaint or job.loaded.family.variant == "inpaint" else "img2img"
        pipe = task_pipeline(job.loaded, task)
        self._prepare_pipe(pipe, job.loaded.family.base, preset, job.notes, job.speed)
        control = self._control(job, pipe, task, width, height, fallback=plans[0].init)
        pipe = self._with_control(job, pipe, control, task, preset)
        self._scheduler(job, pipe, seeds)
        strength = request.denoising_strength
        init: Any = [p.init for p in plans]
        if task == "img2img" and plans[0].latent_upscale and job.loaded.family.variant == "normal":
            init = encode_to_latents(pipe, init, width=width, height=height)
            job.extra_infotext["Resize mode"] = "Just resize (latent upscale)"
        kwargs: dict[str, Any] = {
            **embeds.as_pipeline_kwargs(),
            "image": init,
            "strength": strength,
            "num_inference_steps": img2img_call_steps(request.steps, strength),
            "guidance_scale": request.cfg_scale,
            "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds],
        }
        if inpaint or job.loaded.family.variant == "inpaint":
            from PIL import Image as PILImage

            masks = [p.mask if p.mask is not None else PILImage.new("L", p.size, 255) for p in plans]
            kwargs.update(mask_image=masks, height=height, width=width)
        if request.eta is not None:
            kwargs["eta"] = request.eta
        if control is not None:
            kwargs.update(control.pipeline_kwargs(task))
        steps = max(1, int(img2img_call_steps(request.steps, strength) * strength))
        if job.loaded.family.variant == "edit":
            # instruct-pix2pix conditions on the whole input image: no strength, an image CFG scale.
            image_cfg = request.image_cfg_scale if request.image_cfg_scale is not None else 1.5
            kwargs.pop("strength")
            kwargs.update(num_inference_steps=request.steps, image_guidance_scale=image_cfg)
            job.extra_infotext["Image CFG scale"] = image_cfg
            steps = request.steps
        variation = request.subseed_strength if job.loaded.family.variant != "edit" else 0.0
        if variation > 0 and task == "inpaint" and strength >= 1:
            # Full-strength inpainting starts from pure noise, which the pipeline takes as latents.
            noise = initial_noise(
                seeds, latent_shape(pipe, width, height), subseeds=subseeds, subseed_strength=variation
            )
            kwargs["latents"] = noise.to(device=pipe._execution_device, dtype=pipe.unet.dtype)
            variation = 0.0
        with variation_noise(pipe.scheduler, subseeds, variation):
            latents = denoise(
                pipe,
                kwargs,
                steps=steps,
                batch_index=batch_index,
                batch_count=request.n_iter,
                control=job.control,
                on_progress=job.on_progress,
            )
        if latents is None:
            return None
        _mark_interrupted(job)
        self._decoding(job, batch_index)
        images = self._restore_faces(job, self._decode_final(job, pipe, latents))
        return [plan.finish(image) for plan, image in zip(plans, images, strict=True)]

    # extras ----------------------------------------------------------------------------------
    def extras(
        self,
        request: ExtrasRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """A1111's extras tab: face restoration and upscaling (one or two upscalers blended)."""
        from pipelines.generation.image_ops import load_image
        from pipelines.outputs.infotext import build_infotext

        started = time.perf_counter()
        control = control or JobControl()
        image = load_image(request.image, field="image")
        has_alpha = image.mode in ("RGBA", "LA")
        image = image.convert("RGBA" if has_alpha else "RGB")
        notes: list[str] = []
        params: dict[str, object | None] = {}
        steps = [self._extras_faces, self._extras_upscale]
        if request.upscale_first:
            steps.reverse()
        for index, step in enumerate(steps):
            if control.interrupted:
                raise GenerationInterruptedError("Interrupted before the image was finished.")
            if on_progress:
                on_progress(
                    ProgressEvent(stage="sampling", step=index, steps=len(steps), message="Processing")
                )
            image = step(image, request, notes, params)
        params["Version"] = ENGINE_VERSION
        infotext = build_infotext("", "", {k: v for k, v in params.items() if v is not None})
        ref = self.image_sink.save_image(image, folder="extras", seed=0, infotext=infotext)
        if on_progress:
            on_progress(ProgressEvent(stage="saved", message=ref))
            on_progress(ProgressEvent(stage="done"))
        saved = SavedImage(ref=ref, seed=0, subseed=0, infotext=infotext, image=image)
        return GenerationResult(
            images=[saved], request=request, notes=notes, seconds=time.perf_counter() - started
        )

    def _extras_faces(
        self, image: Image.Image, request: ExtrasRequest, notes: list[str], params: dict[str, object | None]
    ) -> Image.Image:
        from pipelines.postprocess.face_restore import restore_faces

        for model, visibility, key in (
            ("GFPGAN", request.gfpgan_visibility, "GFPGAN visibility"),
            ("CodeFormer", request.codeformer_visibility, "CodeFormer visibility"),
        ):
            if visibility <= 0:
                continue
            result = restore_faces(
                image,
                model=model,
                visibility=visibility,
                codeformer_weight=request.codeformer_weight,
                cache=self.upscaler_cache,
                models_root=self._models_root(),
                detector=self.config.face_detector() if self.config.face_detector else None,
            )
            notes.extend(result.messages)
            params[key] = visibility
            image = result.image
        return image

    def _extras_upscale(
        self, image: Image.Image, request: ExtrasRequest, notes: list[str], params: dict[str, object | None]
    ) -> Image.Image:
        from PIL import Image as PILImage

        from pipelines.postprocess.upscalers import upscale

        if request.upscaler_1 == "None" and request.upscaler_2 == "None":
            return image
        if request.resize_mode == 0:
            sizing: dict[str, Any] = {"scale": request.upscaling_resize}
            params["Postprocess upscale by"] = request.upscaling_resize
        else:
            sizing = {
                "target_size": (request.upscaling_resize_w, request.upscaling_resize_h),
                "crop": request.upscaling_crop,
            }
            params["Postprocess upscale to"] = f"{request.upscaling_resize_w}x{request.upscaling_resize_h}"
            params["Postprocess crop to fit"] = request.upscaling_crop

        sd_x4 = self._sd_x4_upscaler(_sd_upscale_settings(request))

        def run(name: str) -> Image.Image:
            if name == "None":
                name = "Lanczos"
            return upscale(
                image,
                upscaler=name,
                cache=self.upscaler_cache,
                models_root=self._models_root(),
                sd_upscaler=sd_x4,
                **sizing,
            )

        first = run(request.upscaler_1)
        params["Postprocess upscaler"] = request.upscaler_1
        if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
            second = run(request.upscaler_2)
            if second.size != first.size:
                second = second.resize(first.size, PILImage.Resampling.LANCZOS)
            first = PILImage.blend(first, second.convert(first.mode), request.extras_upscaler_2_visibility)
            params["Postprocess upscaler 2"] = request.upscaler_2
            params["Postprocess upscaler 2 visibility"] = request.extras_upscaler_2_visibility
        if sd_x4.used:
            params.update(sd_x4.settings.infotext())
        return first


def _sd_upscale_settings(request: ExtrasRequest) -> SdUpscaleSettings:
    """The SD x4 upscaler settings of an extras request (``sd_upscale_seed=-1``: a random seed)."""
    from pipelines.postprocess.sd_upscaler import SdUpscaleSettings

    seed = request.sd_upscale_seed if request.sd_upscale_seed != RANDOM_SEED else random_seed()
    return SdUpscaleSettings(
        prompt=request.sd_upscale_prompt,
        negative_prompt=request.sd_upscale_negative_prompt,
        noise_level=request.sd_upscale_noise_level,
        steps=request.sd_upscale_steps,
        cfg_scale=request.sd_upscale_cfg_scale,
        seed=seed,
    )


def img2img_call_steps(steps: int, strength: float) -> int:
    """diffusers runs ``int(steps * strength)`` img2img steps; make that at least one (a low
    strength with few steps would otherwise run none and fail)."""
    if strength <= 0 or int(steps * strength) >= 1:
        return steps
    return math.ceil(1 / strength)


def hires_size(request: Txt2ImgRequest) -> tuple[int, int]:
    """A1111's hires target: explicit ``hr_resize_x/y`` (one may be 0: keep the aspect), else scale."""
    if request.hr_resize_x or request.hr_resize_y:
        width = request.hr_resize_x or round(request.hr_resize_y * request.width / request.height)
        height = request.hr_resize_y or round(request.hr_resize_x * request.height / request.width)
    else:
        width, height = round(request.width * request.hr_scale), round(request.height * request.hr_scale)
    return width // 8 * 8, height // 8 * 8


def _sd_x4_settings(request: Txt2ImgRequest, seed: int) -> SdUpscaleSettings:
    """An SD x4 upscaler as hires fix's upscaler follows the job's prompts and seed."""
    from pipelines.postprocess.sd_upscaler import SdUpscaleSettings
    from pipelines.prompts.parser import strip_extra_networks

    return SdUpscaleSettings(
        prompt=strip_extra_networks(request.prompt)[0],
        negative_prompt=strip_extra_networks(request.negative_prompt)[0],
        seed=seed,
    )


def _unchanged_result(plan: Any) -> Image.Image:
    """What a job that changes nothing (strength 0, empty mask) returns for one source."""
    if plan.empty_mask or plan.is_inpaint:
        return plan.original
    if plan.latent_upscale and plan.init.size != plan.size:
        from PIL import Image as PILImage

        return plan.init.resize(plan.size, PILImage.Resampling.LANCZOS)
    return plan.init


def _mark_interrupted(job: _Job, stage: str = "") -> None:
    """An interrupt cut this batch's sampling short: its images are kept (A1111 does), and their
    infotext says so, so nobody mistakes them for the finished picture."""
    stopped = job.control.stopped_at
    if stopped is not None:
        job.extra_infotext["Interrupted"] = f"at {stage}step {stopped[0]} of {stopped[1]}"


def _blank_inpaint_inputs(width: int, height: int, count: int) -> dict[str, Any]:
    """txt2img with an inpainting checkpoint: the whole canvas is masked (A1111 does the same)."""
    from PIL import Image

    image = Image.new("RGB", (width, height), (127, 127, 127))
    mask = Image.new("L", (width, height), 255)
    return {"image": [image] * count, "mask_image": [mask] * count, "strength": 1.0}


def build_request_infotext(
    request: GenerationRequest,
    loaded: LoadedCheckpoint,
    *,
    seed: int,
    subseed: int,
    extra: dict[str, object] | None = None,
    size: tuple[int, int] | None = None,
) -> str:
    """A1111's parameters text for one image of this request; ``size`` is the processing size when
    it is not the request's ``width``x``height`` (outpainting grows the canvas)."""
    from pipelines.outputs.infotext import build_infotext

    params: dict[str, object | None] = {
        "Steps": request.steps,
        "Sampler": request.effective_sampler,
        "Schedule type": request.scheduler,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": "{}x{}".format(*(size or (request.width, request.height))),
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
    params.update(extra or {})
    params["Version"] = ENGINE_VERSION
    return build_infotext(
        request.prompt, request.negative_prompt, {k: v for k, v in params.items() if v is not None}
    )


def _total_vram(device: str | None = None) -> int | None:
    """The memory this process may use on its GPU (``device``, else the current CUDA device): the
    card's total times the per-process fraction a shared GPU sets (``--gpu-share``)."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    if device and device.startswith("cuda:"):
        index = torch.device(device).index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0
    with suppress(AttributeError, RuntimeError):
        fraction = float(torch.cuda.get_per_process_memory_fraction(index))
    return int(total * fraction)
