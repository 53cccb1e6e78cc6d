"""Image upscaling for the extras tab, hires fix and the talking-head enhancer.

Two kinds of upscaler:

* built-ins (``UPSCALER_BUILTINS``): plain PIL resizes that need no model file;
* model upscalers: ESRGAN-family, Real-ESRGAN (Compact), SwinIR, DAT, HAT, ... files that
  `spandrel <https://github.com/chaiNNer-org/spandrel>`_ identifies, dropped into A1111's folders
  ``models/ESRGAN`` (also ``models/RealESRGAN``, ``models/SwinIR``, ``models/DAT``).

Files are read safely: ``.safetensors`` directly, ``.pth``/``.pt`` only through
``torch.load(weights_only=True)``; spandrel then only sees a state dict. Models run *tiled*: the
input is cut into overlapping tiles, each tile goes through the model on its own, and the
overlaps are cross-faded, so accelerator memory depends on the tile size, not on the image size
(the full-size result is assembled in CPU memory).

Loaded models live in an explicit :class:`UpscalerCache` owned by the caller (no module globals);
face restoration (``pipelines.postprocess.face_restore``) loads its models through the same cache.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import (
    CheckpointLoadError,
    ImageModelLoadError,
    OutOfMemoryError,
    StudioError,
    UpscaleRequestError,
    UpscalerFileMissingError,
    UpscalerNotFoundError,
)
from pipelines.generation.memory import free_accelerator_memory, is_out_of_memory
from pipelines.models.safetensors_header import read_safetensors_header
from pipelines.postprocess.sd_upscaler import (
    SD_UPSCALER_FOLDER,
    SD_UPSCALER_SCALE,
    SdX4Upscaler,
    list_sd_upscalers,
    upscaler_name,
)
from pipelines.postprocess.tiling import (
    ProgressCallback,
    axis_weights,
    pil_to_tensor,
    tensor_to_pil,
    tile_starts,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from spandrel import ImageModelDescriptor

UPSCALER_BUILTINS: tuple[str, ...] = ("None", "Lanczos", "Nearest")
# A1111's upscaler folders under ``models/``, searched in this order (first one wins on a name clash).
UPSCALER_FOLDERS: tuple[str, ...] = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")
# Preference order when the same model exists in several formats: safetensors first.
UPSCALER_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt")
# A1111 runs a model at most this many times to reach a wanted scale above the model's own.
MAX_MODEL_PASSES = 3
MIN_TILE = 16
DEFAULT_CACHE_SIZE = 2


@dataclass(frozen=True)
class UpscalerInfo:
    """One choice in the upscaler dropdown.

    ``kind`` is ``"builtin"`` or the A1111 folder the file was found in (``"ESRGAN"``, ...).
    ``scale`` is the model's native factor when it can be told without loading the model (from a
    safetensors header, or a ``4x``/``x4`` in the file name); ``None`` when unknown.
    """

    name: str
    path: Path | None
    kind: str
    scale: int | None


# ---------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------
def _model_files(folder: Path) -> list[Path]:
    """Weight files under ``folder``, one per model: ``x.safetensors`` hides ``x.pth``/``x.pt``."""
    if not folder.is_dir():
        return []
    by_stem: dict[Path, Path] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix not in UPSCALER_SUFFIXES:
            continue
        key = relative.with_suffix("")
        known = by_stem.get(key)
        if known is None or UPSCALER_SUFFIXES.index(suffix) < UPSCALER_SUFFIXES.index(known.suffix.lower()):
            by_stem[key] = path
    return [by_stem[key] for key in sorted(by_stem)]


_NAME_SCALE = re.compile(r"(?:^|[^a-z0-9])(?:(\d{1,2})x|x(\d{1,2}))(?:[^0-9]|$)", re.IGNORECASE)


def scale_from_name(name: str) -> int | None:
    """The factor written in a file name the way upscaler authors do: ``4x-UltraSharp``,
    ``RealESRGAN_x4plus``, ``2xLexica``; ``None`` when there is none."""
    match = _NAME_SCALE.search(name)
    if not match:
        return None
    value = int(match.group(1) or match.group(2))
    return value if 1 <= value <= 16 else None


def _seq_len(keys: Iterable[str], prefix: str) -> int:
    """1 + the highest ``N`` in keys ``prefix.N.*`` (0 when there are none)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    highest = -1
    for key in keys:
        match = pattern.match(key)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def _shuffle_divisor(in_channels: int | None, out_channels: int | None) -> int:
    """Real-ESRGAN x2/x1 models pixel-unshuffle their input first: 4x/16x more input channels."""
    if in_channels and out_channels and in_channels in (out_channels * 4, out_channels * 16):
        return math.isqrt(in_channels // out_channels)
    return 1


def scale_from_safetensors_header(path: Path) -> int | None:
    """Native scale of ESRGAN/Real-ESRGAN/Compact models from tensor names and shapes alone.

    Reads only the header (no tensor data). Other architectures answer ``None``; the file name is
    the fallback then.
    """
    try:
        header = read_safetensors_header(path)
    except StudioError:
        return None
    keys = list(header.tensors)

    def channels(key: str, axis: int) -> int | None:
        shape = header.shape(key)
        return shape[axis] if shape and len(shape) > axis else None

    if "model.0.weight" in header.tensors and any(k.startswith("model.1.sub.") for k in keys):
        length = _seq_len(keys, "model")  # conv, trunk, [upsample, conv, act] * log2(scale), conv, act, conv
        if length < 5:
            return None
        scale = 2 ** ((length - 5) // 3)
        divisor = _shuffle_divisor(channels("model.0.weight", 1), channels(f"model.{length - 1}.weight", 0))
        return max(1, scale // divisor)
    if "conv_first.weight" in header.tensors and "conv_last.weight" in header.tensors:
        ups = {m.group(2) for k in keys if (m := re.match(r"(upconv|conv_up)(\d)\.weight$", k))}
        divisor = _shuffle_divisor(channels("conv_first.weight", 1), channels("conv_last.weight", 0))
        return max(1, 2 ** len(ups) // divisor)
    if "body.0.weight" in header.tensors and "body.1.weight" in header.tensors:  # Real-ESRGAN Compact
        last = _seq_len(keys, "body") - 1
        out_channels = channels(f"body.{last}.bias", 0)
        in_channels = channels("body.0.weight", 1)
        if out_channels and in_channels and out_channels % in_channels == 0:
            root = math.isqrt(out_channels // in_channels)
            if root * root == out_channels // in_channels:
                return root
    return None


def _known_scale(path: Path) -> int | None:
    scale = scale_from_safetensors_header(path) if path.suffix.lower() == ".safetensors" else None
    return scale if scale is not None else scale_from_name(path.stem)


def list_upscalers(models_root: Path) -> list[UpscalerInfo]:
    """Built-ins, then every model file in the upscaler folders (no model is loaded), then the
    Stable Diffusion x4 upscalers of ``models/SD-Upscaler`` (see ``pipelines.postprocess.sd_upscaler``).

    Names are the file path relative to its folder without extension (``4x-UltraSharp``,
    ``sub/model``); a name already taken by an earlier folder is prefixed with its folder
    (``RealESRGAN/4x-UltraSharp``). SD x4 upscalers are named ``SD x4 (<file or folder>)``.
    """
    infos = [UpscalerInfo(name, None, "builtin", None) for name in UPSCALER_BUILTINS]
    taken = {name.lower() for name in UPSCALER_BUILTINS}
    for folder_name in UPSCALER_FOLDERS:
        folder = Path(models_root) / folder_name
        for path in _model_files(folder):
            name = path.relative_to(folder).with_suffix("").as_posix()
            if name.lower() in taken:
                name = f"{folder_name}/{name}"
            taken.add(name.lower())
            infos.append(UpscalerInfo(name, path, folder_name, _known_scale(path)))
    for name, path in list_sd_upscalers(models_root):
        infos.append(UpscalerInfo(upscaler_name(name), path, SD_UPSCALER_FOLDER, SD_UPSCALER_SCALE))
    return infos


def upscaler_catalogue(models_root: Path) -> list[dict[str, Any]]:
    """The upscaler list in the shape of A1111's ``GET /sdapi/v1/upscalers``."""
    return [
        {
            "name": info.name,
            "model_name": None if info.path is None else info.kind,
            "model_path": None if info.path is None else str(info.path),
            "model_url": None,
            "scale": None if info.scale is None else float(info.scale),
        }
        for info in list_upscalers(models_root)
    ]


def find_upscaler(models_root: Path, name: str) -> UpscalerInfo:
    """Resolve what a user typed: a listed name, a file name with extension, a bare stem
    (case-insensitive), or a path to a model file."""
    wanted = name.strip()
    infos = list_upscalers(models_root)
    for matches in (
        lambda info: info.name == wanted,
        lambda info: info.name.lower() == wanted.lower(),
        lambda info: info.path is not None and info.path.name.lower() == wanted.lower(),
        lambda info: info.path is not None and info.path.stem.lower() == wanted.lower(),
    ):
        for info in infos:
            if matches(info):
                if info.path is not None and not info.path.exists():
                    raise UpscalerFileMissingError(
                        f"Upscaler '{info.name}': file {info.path} no longer exists. Refresh the "
                        "upscaler list, or put the file back."
                    )
                return info
    candidate = Path(wanted).expanduser()
    if candidate.suffix.lower() in UPSCALER_SUFFIXES and (
        candidate.is_absolute() or len(candidate.parts) > 1
    ):
        if not candidate.is_file():
            raise UpscalerFileMissingError(
                f"Upscaler file {candidate} does not exist. Check the path, or copy the model into "
                f"{Path(models_root) / 'ESRGAN'}."
            )
        return UpscalerInfo(candidate.stem, candidate, "file", _known_scale(candidate))
    choices = ", ".join(info.name for info in infos)
    raise UpscalerNotFoundError(
        f"Unknown upscaler '{name}'. Choices: {choices}. Model upscalers are .safetensors/.pth files "
        f"in {Path(models_root) / 'ESRGAN'} (or RealESRGAN, SwinIR, DAT); the Stable Diffusion x4 "
        f"upscaler goes in {Path(models_root) / SD_UPSCALER_FOLDER}."
    )


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a model file, read without running pickled code.

    ``.safetensors`` is read as is; ``.pth``/``.pt``/``.ckpt`` only with
    ``torch.load(weights_only=True)``. Wrappers used by training code (``params_ema``,
    ``state_dict``, ``module.`` prefixes) are removed with spandrel's canonicalisation.
    """
    import torch
    from spandrel import canonicalize_state_dict

    path = Path(path)
    if not path.is_file():
        raise UpscalerFileMissingError(f"Model file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            read_safetensors_header(path)  # clear messages for truncated/non-safetensors files
            raw: Any = load_file(str(path), device="cpu")
        except CheckpointLoadError as exc:
            raise ImageModelLoadError(str(exc)) from exc
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ImageModelLoadError(f"{path.name}: cannot read the safetensors file ({exc}).") from exc
    elif suffix in (".pth", ".pt", ".ckpt"):
        import pickle

        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ImageModelLoadError(
                f"{path.name}: the file holds pickled Python objects besides tensors, and SD Studio "
                "only loads .pth/.pt files with torch.load(weights_only=True) because unpickling "
                "can run code. Use a .safetensors version of this model."
            ) from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise ImageModelLoadError(
                f"{path.name}: cannot read the file ({exc}). It may be truncated or a TorchScript "
                "archive; re-download it, preferably as .safetensors."
            ) from exc
    else:
        raise ImageModelLoadError(
            f"{path.name}: unsupported file type '{suffix}'. Use .safetensors (preferred) or .pth."
        )
    if not isinstance(raw, dict):
        raise ImageModelLoadError(f"{path.name}: the file holds a {type(raw).__name__}, not model weights.")
    state = canonicalize_state_dict(raw)
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ImageModelLoadError(f"{path.name}: the file contains no tensors; it is not a model.")
    return tensors


def load_image_model(path: Path) -> ImageModelDescriptor:
    """Load an image-to-image model file on the CPU in float32, in eval mode.

    Raises :class:`ImageModelLoadError` naming the file when spandrel cannot identify it.
    """
    import spandrel
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    state = read_state_dict(path)
    try:
        descriptor = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError as exc:
        sample = ", ".join(list(state)[:4])
        raise ImageModelLoadError(
            f"{Path(path).name}: spandrel {spandrel.__version__} does not recognise this model's "
            f"architecture (first tensors: {sample}). It is not an upscaler/face restoration model "
            "SD Studio can run; check the file is ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, GFPGAN or "
            "RestoreFormer weights."
        ) from exc
    except (KeyError, RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise ImageModelLoadError(
            f"{Path(path).name}: looks like a known architecture but its weights do not fit ({exc}). "
            "The file may be damaged or a variant spandrel does not support."
        ) from exc
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ImageModelLoadError(
            f"{Path(path).name}: is a {descriptor.architecture.name} {descriptor.purpose} model, "
            "not an image upscaler or face restorer."
        )
    return descriptor.eval()


def _torch_device(device: torch.device | str | None) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(
    descriptor: ImageModelDescriptor, device: torch.device, dtype: torch.dtype | str | None
) -> torch.dtype:
    """fp16 on CUDA when the architecture supports it, else float32; an explicit dtype is kept
    when the architecture supports it (spandrel says which do)."""
    import torch

    if isinstance(dtype, str):
        names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16}
        names.update({"bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32})
        if dtype.lower() not in names:
            raise UpscaleRequestError(f"Unknown dtype '{dtype}': use fp16, bf16 or fp32.")
        dtype = names[dtype.lower()]
    if dtype is None:
        return torch.float16 if device.type == "cuda" and descriptor.supports_half else torch.float32
    if dtype == torch.float16 and not descriptor.supports_half:
        return torch.float32
    if dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
        return torch.float32
    return dtype


class UpscalerCache:
    """Loaded spandrel models, least recently used dropped first.

    Keyed by file (path, size, modification time), device and dtype, so a replaced file is
    reloaded. Thread-safe: loads are serialised, lookups are cheap. Owned by whoever runs jobs
    (the app's services), never a module global.
    """

    def __init__(self, max_models: int = DEFAULT_CACHE_SIZE) -> None:
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.max_models = max_models
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[str, ...], ImageModelDescriptor] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def get(
        self,
        path: Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> ImageModelDescriptor:
        """The model in ``path`` on ``device``, loading it on first use (see ``_resolve_dtype``)."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as exc:
            raise UpscalerFileMissingError(f"Model file {path} does not exist.") from exc
        target = _torch_device(device)
        file_key = (str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns))
        wanted = (*file_key, str(target), str(dtype))
        with self._lock:
            cached = self._models.get(wanted)
            if cached is not None:
                self._models.move_to_end(wanted)
                return cached
            descriptor = load_image_model(path)
            descriptor.to(target, _resolve_dtype(descriptor, target, dtype))
            self._models[wanted] = descriptor
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return descriptor

    def clear(self) -> None:
        """Drop every loaded model (e.g. before loading a big checkpoint)."""
        with self._lock:
            self._models.clear()


# ---------------------------------------------------------------------------------------------
# tiled inference
# ---------------------------------------------------------------------------------------------
def run_image_model_tiled(
    descriptor: ImageModelDescriptor,
    image: torch.Tensor,
    *,
    tile: int = 512,
    tile_overlap: int = 32,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run ``descriptor`` on a ``(1, C, H, W)`` float tensor in [0, 1] (any device), tile by tile.

    Each input tile goes to the model's device and dtype; results are blended into a float32
    CPU tensor of shape ``(1, C_out, H*scale, W*scale)``. Within ``tile_overlap // 4`` input
    pixels of a shared tile edge a tile has no weight, so a model whose receptive field is
    smaller than that gives the same result as an untiled run. ``tile=0`` runs untiled.
    """
    import torch

    model_device, model_dtype = descriptor.device, descriptor.dtype
    _, _, height, width = image.shape
    scale = descriptor.scale
    if tile and tile < MIN_TILE:
        raise UpscaleRequestError(f"Tile size {tile} is too small: use 0 (no tiling) or at least {MIN_TILE}.")
    if tile_overlap < 0:
        raise UpscaleRequestError("Tile overlap cannot be negative.")
    with torch.inference_mode():
        if not tile or (height <= tile and width <= tile):
            result = descriptor(image.to(model_device, model_dtype)).float().cpu()
            if progress:
                progress(1, 1)
            return result
        overlap = min(tile_overlap, tile // 2)
        ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        wy = axis_weights(height, tile, ys, scale, overlap)
        wx = axis_weights(width, tile, xs, scale, overlap)
        output = torch.zeros((1, descriptor.output_channels, height * scale, width * scale))
        done, total = 0, len(ys) * len(xs)
        for y, weight_y in zip(ys, wy, strict=True):
            for x, weight_x in zip(xs, wx, strict=True):
                piece = image[:, :, y : y + tile, x : x + tile].to(model_device, model_dtype)
                result = descriptor(piece).float().cpu()
                weight = weight_y[:, None] * weight_x[None, :]
                h_out, w_out = weight.shape
                output[:, :, y * scale : y * scale + h_out, x * scale : x * scale + w_out] += result * weight
                done += 1
                if progress:
                    progress(done, total)
        return output


# ---------------------------------------------------------------------------------------------
# upscale
# ---------------------------------------------------------------------------------------------
def plan_output_size(
    source: tuple[int, int],
    *,
    scale: float | None,
    target_size: tuple[int, int] | None,
    crop: bool = True,
) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Where an upscale ends: ``(resize_to, crop_box)``.

    By factor (A1111 ``upscaling_resize``): ``resize_to = source * scale``. To a size (A1111
    ``upscaling_resize_w/h``): with ``crop`` the image is scaled to cover the size keeping its
    aspect ratio and centre-cropped (A1111's "Crop to fit"); without, it is stretched to it.
    """
    width, height = source
    if target_size is not None:
        target_w, target_h = (int(v) for v in target_size)
        if target_w < 1 or target_h < 1:
            raise UpscaleRequestError(f"Target size {target_w}x{target_h} must be at least 1x1 pixels.")
        if not crop:
            return (target_w, target_h), None
        cover = max(target_w / width, target_h / height)
        resize_to = (max(target_w, round(width * cover)), max(target_h, round(height * cover)))
        left, top = (resize_to[0] - target_w) // 2, (resize_to[1] - target_h) // 2
        box = (left, top, left + target_w, top + target_h)
        return resize_to, (None if resize_to == (target_w, target_h) else box)
    assert scale is not None
    if not scale > 0 or not math.isfinite(scale):
        raise UpscaleRequestError(f"Upscale factor must be a positive number, got {scale}.")
    return (max(1, round(width * scale)), max(1, round(height * scale))), None


def _finish(
    image: Image.Image, resize_to: tuple[int, int], crop_box: tuple[int, int, int, int] | None
) -> Image.Image:
    from PIL import Image

    if image.size != resize_to:
        image = image.resize(resize_to, resample=Image.Resampling.LANCZOS)
    return image.crop(crop_box) if crop_box else image


def upscale(
    image: Image.Image,
    *,
    upscaler: str,
    scale: float | None = None,
    target_size: tuple[int, int] | None = None,
    crop: bool = True,
    tile: int = 512,
    tile_overlap: int = 32,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    cache: UpscalerCache | None,
    models_root: Path,
    progress: ProgressCallback | None = None,
    sd_upscaler: SdX4Upscaler | None = None,
) -> Image.Image:
    """Upscale ``image`` by ``scale`` or to ``target_size`` (``(width, height)``) with ``upscaler``.

    A model upscaler runs until the image reaches the wanted size (at most ``MAX_MODEL_PASSES``
    times, as A1111 does: a 4x model asked for 8x runs twice), then a Lanczos resize gives the
    exact size. With neither ``scale`` nor ``target_size`` a model upscales by its own factor.
    An alpha channel is resized with Lanczos and put back. ``cache=None`` loads the model for
    this call only.

    An ``SD x4 (...)`` upscaler runs once through ``sd_upscaler`` (the engine passes one holding
    its pipeline cache, memory options and the job's prompt/seed/steps; ``None`` loads the
    pipeline for this call only with default settings); beyond 4x the rest is Lanczos.
    """
    from PIL import Image

    if scale is not None and target_size is not None:
        raise UpscaleRequestError("Give either an upscale factor or a target size, not both.")
    info = find_upscaler(models_root, upscaler)
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
    rgb = image.convert("RGB")

    descriptor = None
    is_sd_x4 = info.kind == SD_UPSCALER_FOLDER and info.path is not None
    if is_sd_x4:
        if scale is None and target_size is None:
            scale = float(info.scale or 4)
    elif info.path is not None:
        loaded = cache if cache is not None else UpscalerCache(1)
        descriptor = loaded.get(info.path, device=device, dtype=dtype)
        if descriptor.purpose == "FaceSR":
            raise ImageModelLoadError(
                f"{info.path.name} is a face restoration model ({descriptor.architecture.name}); "
                "use it under Face restoration, not as an upscaler."
            )
    if scale is None and target_size is None:
        if descriptor is None:
            if info.name == "None":
                return image.copy()
            raise UpscaleRequestError(f"Upscaler '{info.name}' needs an upscale factor or a target size.")
        scale = float(descriptor.scale)
    resize_to, crop_box = plan_output_size(rgb.size, scale=scale, target_size=target_size, crop=crop)

    if is_sd_x4:
        runner = sd_upscaler if sd_upscaler is not None else SdX4Upscaler(progress=progress)
        assert info.path is not None
        result = _finish(runner.upscale_to_cover(rgb, info.path, resize_to), resize_to, crop_box)
    elif descriptor is None:
        method = Image.Resampling.NEAREST if info.name == "Nearest" else Image.Resampling.LANCZOS
        result = rgb.resize(resize_to, resample=method) if rgb.size != resize_to else rgb.copy()
        result = result.crop(crop_box) if crop_box else result
    else:
        result = _finish(
            _run_model_passes(rgb, descriptor, resize_to, tile, tile_overlap, progress), resize_to, crop_box
        )
    if alpha is not None:
        result = result.convert("RGBA")
        result.putalpha(_finish(alpha, resize_to, crop_box))
    return result


def _run_model_passes(
    rgb: Image.Image,
    descriptor: ImageModelDescriptor,
    resize_to: tuple[int, int],
    tile: int,
    tile_overlap: int,
    progress: ProgressCallback | None,
) -> Image.Image:
    """Apply the model until ``rgb`` covers ``resize_to`` (a 1x model runs once)."""
    current = rgb
    for _ in range(MAX_MODEL_PASSES):
        if descriptor.scale > 1 and current.width >= resize_to[0] and current.height >= resize_to[1]:
            break
        single_channel = descriptor.input_channels == 1
        source = current.convert("L") if single_channel else current
        try:
            output = run_image_model_tiled(
                descriptor, pil_to_tensor(source), tile=tile, tile_overlap=tile_overlap, progress=progress
            )
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            free_accelerator_memory()
            raise OutOfMemoryError(
                f"Out of memory while upscaling with {descriptor.architecture.name} at tile size "
                f"{tile or 'off'}. Lower the tile size (e.g. 256) and try again."
            ) from exc
        current = tensor_to_pil(output).convert("RGB")
        if descriptor.scale == 1:
            break
    return current
