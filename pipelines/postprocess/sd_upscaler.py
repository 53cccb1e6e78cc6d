"""The Stable Diffusion x4 upscaler (``stabilityai/stable-diffusion-x4-upscaler``) as an upscaler.

Unlike the spandrel models in ``pipelines.postprocess.upscalers`` this is a text-guided latent diffusion
model: the low-resolution image, noised to ``noise_level``, is concatenated to 4 latent channels (the UNet
sees 7), denoised from random latents for a number of steps, and decoded by a VAE that upsamples 4x.
So the result depends on a seed (always drawn from a CPU generator: the same seed gives the same
image on any device), on a prompt (empty by default; an empty prompt and negative prompt make
classifier-free guidance a no-op, so it is skipped), on the noise level and on the step count.

Where the weights live: ``models/SD-Upscaler/``, either

* a diffusers folder of the hub repo (``model_index.json`` naming ``StableDiffusionUpscalePipeline``,
  with ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, ``low_res_scheduler/`` and
  ``.safetensors`` weights; a missing ``tokenizer/`` is rebuilt offline), or
* the original single file ``x4-upscaler-ema.safetensors``, converted by diffusers'
  ``from_single_file`` with the component configs shipped in ``configs/sd-x4-upscaler/`` (the
  hub repo's JSON files) and the SD2 OpenCLIP tokenizer from ``pipelines.prompts.tokenizer``: nothing is
  fetched from the network.

Each one appears in the upscaler list as ``SD x4 (<name>)`` with scale 4.

Memory: activations grow with the input area, so inputs larger than ``tile`` pixels (default 128,
giving 512-pixel output tiles) are cut into overlapping tiles that run one by one (each with its
own seed, ``seed + tile index``) and are cross-faded with ``pipelines.postprocess.tiling``' feathered
weights; the full-size result is assembled in CPU memory. The engine's memory options (dtype,
attention, slicing, offload) are applied to the pipeline, except that the VAE always runs in
float32 (the original config notes that this decoder breaks in half precision) and the UNet is
never compiled. On running out of memory the tile size is halved and the upscale retried.

Loaded pipelines live in an :class:`SdUpscalerCache` owned by the caller (the engine), one at a
time, never in a module global.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import (
    CheckpointLoadError,
    OutOfMemoryError,
    UpscaleRequestError,
    UpscalerFileMissingError,
)
from pipelines.generation.memory import (
    MemoryOptions,
    apply_memory_options,
    free_accelerator_memory,
    is_out_of_memory,
    resolve_device,
)
from pipelines.models.family_configs import CONFIGS_ROOT
from pipelines.models.safetensors_header import read_safetensors_header
from pipelines.postprocess.tiling import ProgressCallback, axis_weights, tensor_to_pil, tile_starts
from pipelines.prompts.tokenizer import build_clip_tokenizer

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

SD_UPSCALER_FOLDER = "SD-Upscaler"
"""The folder under ``models/`` holding x4 upscaler weights; also the ``kind`` of its upscalers."""
SD_UPSCALER_SCALE = 4
SD_UPSCALER_PIPELINE = "StableDiffusionUpscalePipeline"
SD_UPSCALER_CONFIG_DIR = CONFIGS_ROOT / "sd-x4-upscaler"
"""Config-only diffusers repo of ``stabilityai/stable-diffusion-x4-upscaler`` (see configs/README.md)."""

DEFAULT_NOISE_LEVEL = 20  # diffusers' and the model card's default
DEFAULT_STEPS = 20  # diffusers defaults to 75; 20 DDIM steps keep an upscale quick
DEFAULT_CFG_SCALE = 9.0  # diffusers' default; only matters with a prompt
DEFAULT_TILE = 128  # input pixels; 512-pixel output tiles fit a few GB of VRAM
DEFAULT_TILE_OVERLAP = 32
MIN_TILE = 32
MAX_NOISE_LEVEL = 350  # the model was trained with noise levels 0..350 (model_index max_noise_level)

# Components a diffusers folder must have: folder -> (config file, weights file stem or None).
_FOLDER_COMPONENTS: dict[str, tuple[str, str | None]] = {
    "unet": ("config.json", "diffusion_pytorch_model"),
    "vae": ("config.json", "diffusion_pytorch_model"),
    "text_encoder": ("config.json", "model"),
    "scheduler": ("scheduler_config.json", None),
    "low_res_scheduler": ("scheduler_config.json", None),
}
_OPEN_CLIP_PAD_TOKEN = "!"  # SD2's OpenCLIP tokenizer pads with "!" (special_tokens_map.json)
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_NOISE_LEVEL_EMBEDDING = "model.diffusion_model.label_emb.weight"
_UPSCALER_UNET_IN_CHANNELS = 7  # 4 latent channels + the low-resolution RGB image


class SdUpscalerLoadError(CheckpointLoadError):
    """SD x4 upscaler weights are incomplete, corrupt or not an x4 upscaler."""


@dataclass(frozen=True)
class SdUpscaleSettings:
    """How one SD x4 upscale runs. ``seed`` must already be resolved (no -1)."""

    prompt: str = ""
    negative_prompt: str = ""
    noise_level: int = DEFAULT_NOISE_LEVEL
    steps: int = DEFAULT_STEPS
    cfg_scale: float = DEFAULT_CFG_SCALE
    seed: int = 0
    tile: int = DEFAULT_TILE
    tile_overlap: int = DEFAULT_TILE_OVERLAP

    def check(self) -> None:
        """Raise :class:`UpscaleRequestError` naming the setting that is out of range."""
        if not 0 <= self.noise_level <= MAX_NOISE_LEVEL:
            raise UpscaleRequestError(
                f"SD x4 noise level {self.noise_level} is out of range: use 0 to {MAX_NOISE_LEVEL} "
                f"(default {DEFAULT_NOISE_LEVEL})."
            )
        if self.steps < 1:
            raise UpscaleRequestError(f"SD x4 steps must be at least 1, got {self.steps}.")
        if self.seed < 0:
            raise UpscaleRequestError(f"SD x4 seed must be resolved to a number >= 0, got {self.seed}.")
        if self.tile and self.tile < MIN_TILE:
            raise UpscaleRequestError(
                f"SD x4 tile size {self.tile} is too small: use 0 (no tiling) or at least {MIN_TILE}."
            )
        if self.tile_overlap < 0:
            raise UpscaleRequestError("SD x4 tile overlap cannot be negative.")

    def infotext(self) -> dict[str, object]:
        """A1111-style parameters recording this run (the prompt only when there is one)."""
        return {
            "SD upscale prompt": self.prompt or None,
            "SD upscale negative prompt": self.negative_prompt or None,
            "SD upscale noise level": self.noise_level,
            "SD upscale steps": self.steps,
            "SD upscale CFG scale": self.cfg_scale if self.guided else None,
            "SD upscale seed": self.seed,
        }

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance changes anything: identical prompts cancel out."""
        return self.cfg_scale > 1.0 and self.prompt != self.negative_prompt


# ---------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------
def upscaler_name(name: str) -> str:
    """The name shown in upscaler lists for the model ``name`` found in ``models/SD-Upscaler``."""
    return f"SD x{SD_UPSCALER_SCALE} ({name})"


def list_sd_upscalers(models_root: Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of every x4 upscaler in ``models/SD-Upscaler`` (nothing is loaded).

    A folder with a ``model_index.json`` is a diffusers model; a ``.safetensors`` file outside such
    folders (and not next to a ``config.json``, as diffusers component weights are) is a single-file
    model. A top-level folder holding neither (half-copied) is listed too, so that choosing it
    explains what is missing instead of the name silently vanishing. Names are paths relative to
    ``models/SD-Upscaler``, without the ``.safetensors`` suffix.
    """
    folder = Path(models_root) / SD_UPSCALER_FOLDER
    if not folder.is_dir():
        return []

    def visible(path: Path) -> bool:
        return not any(part.startswith(".") for part in path.relative_to(folder).parts)

    model_dirs = sorted(p.parent for p in folder.rglob("model_index.json") if visible(p))
    found = [(d.relative_to(folder).as_posix(), d) for d in model_dirs if d != folder]
    if folder in model_dirs:  # the repo copied straight into models/SD-Upscaler
        found.append((folder.name, folder))
    for path in sorted(folder.rglob("*.safetensors")):
        inside_model = any(d in path.parents for d in model_dirs)
        component = (path.parent / "config.json").is_file()  # e.g. unet/ of a half-copied folder
        if path.is_file() and visible(path) and not inside_model and not component:
            found.append((path.relative_to(folder).with_suffix("").as_posix(), path))
    if folder not in model_dirs:
        for child in sorted(folder.iterdir()):
            holds_model = any(child == path or child in path.parents for _, path in found)
            if child.is_dir() and visible(child) and not holds_model:
                found.append((child.name, child))
    return sorted(found, key=lambda item: item[0].lower())


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _check_safetensors(path: Path, where: Path) -> None:
    try:
        read_safetensors_header(path)
    except CheckpointLoadError as exc:
        raise SdUpscalerLoadError(
            f"SD x4 upscaler {where.name}: {path.relative_to(where.parent)} is damaged ({exc}). "
            "Download that file again."
        ) from exc


def _weight_files(component_dir: Path, stem: str) -> list[Path] | None:
    """The safetensors files ``from_pretrained`` reads for one component (plain or sharded)."""
    single = component_dir / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = component_dir / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [component_dir / str(name) for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SdUpscalerLoadError(
                f"SD x4 upscaler: the shard index {index} is damaged ({exc}). Download it again."
            ) from exc
    return None


def check_diffusers_folder(path: Path) -> None:
    """Raise :class:`SdUpscalerLoadError` naming everything missing or damaged in a diffusers folder."""
    index_file = path / "model_index.json"
    expected = ", ".join(["model_index.json", *(f"{name}/" for name in _FOLDER_COMPONENTS)])
    if not index_file.is_file():
        raise SdUpscalerLoadError(
            f"SD x4 upscaler folder {path} has no model_index.json, so it is not a complete diffusers "
            f"folder. Copy the whole stabilityai/stable-diffusion-x4-upscaler repo into it ({expected}), "
            "or put the single file x4-upscaler-ema.safetensors in models/SD-Upscaler instead."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SdUpscalerLoadError(
            f"SD x4 upscaler {path.name}: model_index.json is not valid JSON ({exc}). Download it again."
        ) from exc
    if not isinstance(index, dict) or index.get("_class_name") != SD_UPSCALER_PIPELINE:
        found = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
        raise SdUpscalerLoadError(
            f"{path.name}: model_index.json describes a {found}, not the SD x4 upscaler "
            f"({SD_UPSCALER_PIPELINE}). Stable Diffusion checkpoints belong in models/Stable-diffusion."
        )
    missing: list[str] = []
    weights: list[Path] = []
    for component, (config_name, stem) in _FOLDER_COMPONENTS.items():
        component_dir = path / component
        if not (component_dir / config_name).is_file():
            missing.append(f"{component}/{config_name}")
        if stem is not None:
            files = _weight_files(component_dir, stem)
            if files is None:
                missing.append(f"{component}/{stem}.safetensors")
            else:
                weights.extend(files)
    if missing:
        bins = [
            f"{c}/{s}.bin"
            for c, (_, s) in _FOLDER_COMPONENTS.items()
            if s and (path / c / f"{s}.bin").is_file()
        ]
        hint = (
            " Only pickled .bin weights are there; SD Studio loads .safetensors only (download those)."
            if bins
            else " Copy the missing files from stabilityai/stable-diffusion-x4-upscaler."
        )
        raise SdUpscalerLoadError(
            f"SD x4 upscaler folder {path} is incomplete: missing {', '.join(missing)}.{hint}"
        )
    for file in weights:
        if not file.is_file():
            raise SdUpscalerLoadError(
                f"SD x4 upscaler folder {path} is incomplete: missing {file.relative_to(path).as_posix()} "
                "(listed in its shard index). Download it again."
            )
        _check_safetensors(file, path)


def _load_folder(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionUpscalePipeline
    from safetensors import SafetensorError

    check_diffusers_folder(path)
    overrides: dict[str, Any] = {}
    tokenizer_dir = path / "tokenizer"
    if not ((tokenizer_dir / "vocab.json").is_file() or (tokenizer_dir / "tokenizer.json").is_file()):
        overrides["tokenizer"] = build_clip_tokenizer(pad_token=_OPEN_CLIP_PAD_TOKEN)
    try:
        return StableDiffusionUpscalePipeline.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, use_safetensors=True, **overrides
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise SdUpscalerLoadError(
            f"SD x4 upscaler folder {path}: cannot load it ({exc.__class__.__name__}: {exc}). "
            "A file may be damaged or from another model; download the folder again."
        ) from exc


def _check_single_file(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise SdUpscalerLoadError(
            f"{path.name}: SD x4 upscaler single files are read as .safetensors only (pickled "
            "checkpoints can run code). Use x4-upscaler-ema.safetensors."
        )
    try:
        header = read_safetensors_header(path)
    except CheckpointLoadError as exc:
        raise SdUpscalerLoadError(
            f"SD x4 upscaler file {exc} Put a complete copy in models/SD-Upscaler."
        ) from exc
    conv_in = header.shape(_UNET_CONV_IN)
    if conv_in is None or len(conv_in) != 4 or _NOISE_LEVEL_EMBEDDING not in header.tensors:
        raise SdUpscalerLoadError(
            f"{path.name}: not an original-layout SD x4 upscaler checkpoint (no UNet noise-level "
            "embedding). Stable Diffusion checkpoints belong in models/Stable-diffusion."
        )
    if conv_in[1] != _UPSCALER_UNET_IN_CHANNELS:
        raise SdUpscalerLoadError(
            f"{path.name}: its UNet takes {conv_in[1]} input channels; the SD x4 upscaler takes "
            f"{_UPSCALER_UNET_IN_CHANNELS}. This is another kind of model."
        )


def _load_single_file(path: Path, config_dir: Path, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionUpscalePipeline
    from safetensors import SafetensorError

    _check_single_file(path)
    if not (config_dir / "model_index.json").is_file():
        raise SdUpscalerLoadError(
            f"The SD x4 upscaler configs are missing from {config_dir}; restore them from the "
            "repository (git checkout -- configs/)."
        )
    try:
        return StableDiffusionUpscalePipeline.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            dtype=dtype,
            tokenizer=build_clip_tokenizer(pad_token=_OPEN_CLIP_PAD_TOKEN),
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError, SafetensorError) as exc:
        raise SdUpscalerLoadError(
            f"{path.name}: cannot build the SD x4 upscaler from this file ({exc.__class__.__name__}: "
            f"{exc}). The file may be damaged (download it again) or be a different model."
        ) from exc


def load_sd_upscaler(path: Path, *, config_dir: Path = SD_UPSCALER_CONFIG_DIR, dtype: Any = None) -> Any:
    """A ``StableDiffusionUpscalePipeline`` (CPU, float32 unless ``dtype``) from a diffusers folder
    or an original single file; ``config_dir`` holds the component configs for single files."""
    import torch

    path = Path(path)
    dtype = dtype or torch.float32
    if path.is_dir():
        pipe = _load_folder(path, dtype)
    elif path.is_file():
        pipe = _load_single_file(path, Path(config_dir), dtype)
    else:
        raise UpscalerFileMissingError(
            f"SD x4 upscaler {path} no longer exists. Refresh the upscaler list, or put it back in "
            f"models/{SD_UPSCALER_FOLDER}."
        )
    if getattr(pipe, "vae_scale_factor", None) != SD_UPSCALER_SCALE:
        raise SdUpscalerLoadError(
            f"{path.name}: its VAE scales by {getattr(pipe, 'vae_scale_factor', '?')}, not "
            f"{SD_UPSCALER_SCALE}; this is not the SD x4 upscaler."
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_key(path: Path) -> tuple[str, ...]:
    """Identity of the weights on disk: a replaced file or a changed folder is reloaded."""
    path = Path(path)
    try:
        stat = path.stat()
        stamps = [str(stat.st_size), str(stat.st_mtime_ns)]
        if path.is_dir():
            for file in [*sorted(path.glob("*/*.safetensors")), path / "model_index.json"]:
                if file.is_file():
                    file_stat = file.stat()
                    stamps += [file.name, str(file_stat.st_size), str(file_stat.st_mtime_ns)]
    except OSError as exc:
        raise UpscalerFileMissingError(f"SD x4 upscaler {path} does not exist.") from exc
    return (str(path.resolve()), *stamps)


def prepare_pipeline(pipe: Any, options: MemoryOptions | None) -> list[str]:
    """Apply the engine's memory options (see the module docstring for what is overridden)."""
    options = (options or MemoryOptions()).model_copy(update={"no_half_vae": True, "compile": False})
    return apply_memory_options(pipe, options, resolve_device(options))


class SdUpscalerCache:
    """The one loaded x4 upscaler pipeline, with the memory options it was prepared for.

    Asking for another model (or other options) drops the loaded one first, so two never sit in
    memory together. Thread-safe; owned by the engine, never a module global.
    """

    def __init__(self, *, config_dir: Path = SD_UPSCALER_CONFIG_DIR) -> None:
        self.config_dir = Path(config_dir)
        self._lock = threading.Lock()
        self._key: tuple[str, ...] | None = None
        self._pipe: Any = None

    def __len__(self) -> int:
        with self._lock:
            return 0 if self._pipe is None else 1

    def get(self, path: Path, options: MemoryOptions | None = None) -> Any:
        """The pipeline for ``path`` prepared with ``options``, loading it on first use."""
        key = (*_model_key(path), options.model_dump_json() if options is not None else "default")
        with self._lock:
            if self._key == key and self._pipe is not None:
                return self._pipe
            self._drop()
            pipe = load_sd_upscaler(path, config_dir=self.config_dir)
            for line in prepare_pipeline(pipe, options):
                log.info("SD x4 upscaler %s", line)
            self._key, self._pipe = key, pipe
            return pipe

    def clear(self) -> None:
        """Drop the loaded pipeline (e.g. before loading a big checkpoint)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._pipe is None:
            return

        self._key, self._pipe = None, None
        free_accelerator_memory()


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _size_multiple(pipe: Any) -> int:
    """Input sides must be multiples of this: the image processor floors sizes to the VAE factor
    and the UNet halves the latent (= input) size once per down block but the last."""
    unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    return math.lcm(unet_factor, int(pipe.vae_scale_factor))


def _pad_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Extend the right/bottom edges by repeating the border pixels (cropped off afterwards)."""
    import numpy as np
    from PIL import Image as PILImage

    width, height = image.size
    pad_w, pad_h = -width % multiple, -height % multiple
    if not pad_w and not pad_h:
        return image
    array = np.asarray(image)
    return PILImage.fromarray(np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"))


def _encode_prompts(pipe: Any, settings: SdUpscaleSettings) -> tuple[Any, Any]:
    """Prompt embeddings, once for all tiles (negative ones only when guidance is on)."""
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        settings.prompt,
        pipe._execution_device,
        1,
        settings.guided,
        settings.negative_prompt,
    )
    return prompt_embeds, negative_embeds if settings.guided else None


def _run_piece(
    pipe: Any, piece: Image.Image, embeds: tuple[Any, Any], settings: SdUpscaleSettings, seed: int
) -> torch.Tensor:
    """x4 of one RGB image: ``(1, 3, 4h, 4w)`` float32 CPU tensor in [0, 1]."""
    import torch

    width, height = piece.size
    padded = _pad_to_multiple(piece, _size_multiple(pipe))
    output = pipe(
        image=padded,
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        num_inference_steps=settings.steps,
        guidance_scale=settings.cfg_scale if settings.guided else 1.0,
        noise_level=settings.noise_level,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    ).images
    scale = SD_UPSCALER_SCALE
    return output[:, :, : height * scale, : width * scale].float().cpu()


def upscale_x4(
    pipe: Any,
    image: Image.Image,
    settings: SdUpscaleSettings,
    progress: ProgressCallback | None = None,
) -> Image.Image:
    """Run the x4 upscaler on an RGB image, tiled when it is larger than ``settings.tile``."""
    import torch

    settings.check()
    image = image.convert("RGB")
    width, height = image.size
    tile, scale = settings.tile, SD_UPSCALER_SCALE
    with torch.inference_mode():
        embeds = _encode_prompts(pipe, settings)
        if not tile or (width <= tile and height <= tile):
            result = _run_piece(pipe, image, embeds, settings, settings.seed)
            if progress:
                progress(1, 1)
            return tensor_to_pil(result)
        overlap = min(settings.tile_overlap, tile // 2)
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        weights_y = axis_weights(height, tile, ys, scale, overlap)
        weights_x = axis_weights(width, tile, xs, scale, overlap)
        output = torch.zeros((1, 3, height * scale, width * scale))
        total = len(ys) * len(xs)
        for row, (y, weight_y) in enumerate(zip(ys, weights_y, strict=True)):
            for column, (x, weight_x) in enumerate(zip(xs, weights_x, strict=True)):
                index = row * len(xs) + column
                piece = image.crop((x, y, min(x + tile, width), min(y + tile, height)))
                result = _run_piece(pipe, piece, embeds, settings, settings.seed + index)
                weight = weight_y[:, None] * weight_x[None, :]
                h_out, w_out = weight.shape
                output[:, :, y * scale : y * scale + h_out, x * scale : x * scale + w_out] += result * weight
                if progress:
                    progress(index + 1, total)
        return tensor_to_pil(output)


class SdX4Upscaler:
    """What ``pipelines.postprocess.upscalers.upscale`` calls for an ``SD x4 (...)`` upscaler.

    Bundles the engine's pipeline cache, memory options and this job's settings. ``used`` tells
    the caller afterwards whether an SD x4 model actually ran (to record its settings).
    """

    def __init__(
        self,
        cache: SdUpscalerCache | None = None,
        *,
        settings: SdUpscaleSettings | None = None,
        memory: MemoryOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.cache = cache if cache is not None else SdUpscalerCache()
        self.settings = settings or SdUpscaleSettings()
        self.memory = memory
        self.progress = progress
        self.used = False

    def upscale_to_cover(self, rgb: Image.Image, path: Path, size: tuple[int, int]) -> Image.Image:
        """One x4 pass unless ``rgb`` already covers ``size`` (the caller resizes to exactly it)."""
        if rgb.width >= size[0] and rgb.height >= size[1]:
            return rgb
        self.settings.check()
        pipe = self.cache.get(path, self.memory)
        self.used = True
        return self._run_with_retry(pipe, rgb)

    def _run_with_retry(self, pipe: Any, rgb: Image.Image) -> Image.Image:
        """Halve the tile size on out-of-memory until it works or the tile gets too small."""
        settings = self.settings
        while True:
            try:
                return upscale_x4(pipe, rgb, settings, self.progress)
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                free_accelerator_memory()
                current = settings.tile or max(rgb.size)
                smaller = current // 2 // 8 * 8
                if smaller < MIN_TILE:
                    raise OutOfMemoryError(
                        f"Out of memory while upscaling with the SD x4 upscaler, even with {current}-pixel "
                        "tiles. Start SD Studio with --medvram or --lowvram, or upscale a smaller image."
                    ) from exc
                log.warning(
                    "SD x4 upscaler ran out of memory with %s px tiles; retrying with %s", current, smaller
                )
                settings = replace(settings, tile=smaller)
