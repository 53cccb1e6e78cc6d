"""ControlNet the way the A1111 ``sd-webui-controlnet`` extension does it, on diffusers' pipelines.

* **Models** live in ``models/ControlNet``: single files in the original ``cldm`` layout (keys
  ``control_model.*`` or unprefixed, e.g. ``control_v11p_sd15_canny.safetensors``) and diffusers
  folders (``config.json`` + weights). Single files carry no config, so the architecture is read
  off the tensor shapes; the attention head count, which shapes do not reveal, comes from a
  sidecar ``<name>.yaml`` (the extension's ``cldm_v15.yaml``/``cldm_v21.yaml`` style) or the
  family's standard value. Nothing is downloaded.
* **Preprocessors** are keyed by the extension's module names. ``none``, ``invert``, ``canny`` and
  a few other model-free ones run here; the annotator networks (depth, pose, HED...) run from the
  files the extension downloads, found in ``models/ControlNet/annotators`` (see
  :mod:`pipelines.controlnet.annotators`); asking for one whose file is missing names the file and
  where to get it. Segmentation and DWPose are listed but not supported.
* **Units** are the extension's API units (:class:`ControlNetUnit`); :func:`prepare_control_inputs`
  turns enabled units into the arguments of a diffusers ``StableDiffusion[XL]ControlNetPipeline``.

Control modes on diffusers (the extension's ``hook.py`` semantics):

* ``Balanced``: every ControlNet residual is multiplied by the unit weight, for both halves of the
  classifier-free-guidance batch: diffusers' plain behaviour.
* ``My prompt is more important``: "soft injection": residual ``i`` of the 13 (SD1/SD2; SDXL
  uses the first 10) is additionally scaled by ``0.825 ** (12 - i)``, so deep layers keep more
  control than shallow ones. diffusers has no per-unit option for this; we wrap the unit's model
  in an adapter that applies exactly these factors.
* ``ControlNet is more important``: soft injection *and* the control goes only into the
  conditional half of the CFG batch. That is diffusers' ``guess_mode`` (whose factors
  ``10 ** (-(12 - i) / 12) = 0.8254 ** (12 - i)`` match the extension's to within 0.6%), used when
  every unit of an SD1/SD2 job is in this mode; otherwise (mixed modes, or SDXL, where diffusers'
  factors differ) the same adapter zeroes the unconditional half for that unit only.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import hashlib
import inspect
import io
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from contract.controlnet import (
    ControlNetUnit,
    resolve_preprocessor_name,
)
from pipelines.controlnet import annotators as annotators_module
from pipelines.errors import CheckpointLoadError, ModelNotFoundError, StudioError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.controlnet.annotators import AnnotatorCache, AnnotatorFunction
    from pipelines.models.families import ModelFamily

log = logging.getLogger(__name__)

CONTROLNET_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
ANNOTATOR_FOLDER = "annotators"
"""Subfolder of ``models/ControlNet`` for preprocessor (annotator) weights; never listed as models."""

SOFT_INJECTION_BASE = 0.825
"""The extension's "soft injection" factor: residual ``i`` of 13 is scaled by ``0.825 ** (12 - i)``."""

_BASE_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
_CONTEXT_WIDTH_BASES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


class ControlNetError(StudioError):
    """A ControlNet unit cannot be used as requested (message names the unit, field or file)."""


class ControlNetNotFoundError(ControlNetError, ModelNotFoundError):
    """The unit names a model that is not in ``models/ControlNet``."""


class ControlNetFamilyError(ControlNetError):
    """The ControlNet was made for another model family than the loaded checkpoint."""


class AnnotatorMissingError(ControlNetError, ModelNotFoundError):
    """A preprocessor needs annotator weights that are not on disk."""


class AnnotatorLoadError(ControlNetError, CheckpointLoadError):
    """An annotator weight file is there but cannot be used (refused pickle, damaged, wrong file)."""

    def __init__(self, filename: str, message: str) -> None:
        super().__init__(message)
        self.filename = filename


# ============================================================================================
# Preprocessors
# ============================================================================================


@dataclass(frozen=True)
class Slider:
    """One preprocessor parameter as the extension's UI/API describes it."""

    label: str
    minimum: float
    maximum: float
    value: float
    step: float = 0.01

    def api_json(self) -> dict[str, float | str]:
        """The entry in ``/controlnet/module_list``'s ``module_detail[...]["sliders"]``."""
        return {
            "name": self.label,
            "value": self.value,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
        }

    def clamp_or_default(self, value: float) -> float:
        """The extension resets out-of-range values (including the API's ``-1``) to the default."""
        return value if self.minimum <= value <= self.maximum else self.value


@dataclass(frozen=True)
class AnnotatorFile:
    """A weight file a preprocessor needs, where the extension keeps it and where to get it."""

    filename: str
    subfolder: str
    url: str


PreprocessorFunction = Callable[["np.ndarray", int, float, float], "np.ndarray"]


@dataclass(frozen=True)
class Preprocessor:
    """An entry of :data:`PREPROCESSORS`.

    ``api_name`` is the extension's internal module name (what ``/controlnet/module_list`` returns
    and API clients send), ``label`` its UI name; both are accepted wherever a module is named.
    ``run`` runs a model-free preprocessor, ``run_network`` an annotator network from its
    ``annotator_files``; both ``None``: not supported, and ``unsupported`` says what to do instead.
    """

    api_name: str
    label: str
    resolution: Slider | None
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    annotator_files: tuple[AnnotatorFile, ...] = ()
    run: PreprocessorFunction | None = None
    priority: int = 0
    model_free: bool = False
    """The extension's ``model_free``: the module needs no ControlNet model (e.g. reference-only)."""
    run_network: AnnotatorFunction | None = None
    unsupported: str = ""


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)


def _hwc3(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3: grey is repeated, an alpha channel is composited over white (as the
    extension's ``HWC3``)."""
    import numpy as np

    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image] * 3, axis=2)
    if channels in (2, 4):
        color = image[:, :, :-1].astype(np.float32)
        if channels == 2:
            color = np.concatenate([color] * 3, axis=2)
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise ControlNetError(f"Control image has {channels} channels; use an RGB, RGBA or greyscale image.")


def _resize_with_pad64(
    image: np.ndarray, resolution: int
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale so the short side is ``resolution``, then edge-pad to multiples of 64 (what the
    annotator networks want); returns the image and a function that crops a result back."""
    import cv2
    import numpy as np

    image = _hwc3(image)
    height, width = image.shape[:2]
    scale = float(resolution) / float(min(height, width))
    target_h, target_w = int(np.round(height * scale)), int(np.round(width * scale))
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    resized = cv2.resize(image, (target_w, target_h), interpolation=interpolation)
    pad_h, pad_w = -target_h % 64, -target_w % 64
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")

    def remove_pad(result: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(result[:target_h, :target_w])

    return np.ascontiguousarray(padded), remove_pad


def _run_none(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    return _hwc3(image)


def _run_invert(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    return 255 - _hwc3(image)


def _run_canny(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    import cv2

    padded, remove_pad = _resize_with_pad64(image, resolution)
    edges = cv2.Canny(padded, int(threshold_a), int(threshold_b))
    return _hwc3(remove_pad(edges))


def _run_threshold(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    import numpy as np

    padded, remove_pad = _resize_with_pad64(image, resolution)
    result = np.zeros(padded.shape[:2], dtype=np.uint8)
    result[np.min(padded, axis=2) > threshold_a] = 255
    return _hwc3(remove_pad(result))


def _run_scribble_xdog(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2
    import numpy as np

    padded, remove_pad = _resize_with_pad64(image, resolution)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    difference = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros(padded.shape[:2], dtype=np.uint8)
    result[2 * (255 - difference.astype(np.int32)) > threshold_a] = 255
    return _hwc3(remove_pad(result))


def _run_tile_resample(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2

    image = _hwc3(image)
    if threshold_a < 1.1:
        return image
    height, width = image.shape[:2]
    size = (max(1, int(width / threshold_a)), max(1, int(height / threshold_a)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _run_blur_gaussian(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2

    padded, remove_pad = _resize_with_pad64(image, resolution)
    return cv2.GaussianBlur(remove_pad(padded), (0, 0), float(threshold_a))


def _run_lineart_standard(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2
    import numpy as np

    padded, remove_pad = _resize_with_pad64(image, resolution)
    pixels = padded.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), 6.0)
    intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    intensity *= 127
    return _hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


_ANNOTATORS_HF = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"
_CONTROLNET_CKPTS = "https://huggingface.co/lllyasviel/ControlNet/resolve/main/annotator/ckpts/"
_MIDAS = AnnotatorFile(
    "dpt_hybrid-midas-501f0c75.pt", "midas", _CONTROLNET_CKPTS + "dpt_hybrid-midas-501f0c75.pt"
)
_BODY = AnnotatorFile("body_pose_model.pth", "openpose", _ANNOTATORS_HF + "body_pose_model.pth")
_HAND = AnnotatorFile("hand_pose_model.pth", "openpose", _ANNOTATORS_HF + "hand_pose_model.pth")
_FACE = AnnotatorFile("facenet.pth", "openpose", _ANNOTATORS_HF + "facenet.pth")
_HED = AnnotatorFile("ControlNetHED.pth", "hed", _ANNOTATORS_HF + "ControlNetHED.pth")
_PIDINET = AnnotatorFile("table5_pidinet.pth", "pidinet", _ANNOTATORS_HF + "table5_pidinet.pth")
_LERES = AnnotatorFile("res101.pth", "leres", _ANNOTATORS_HF + "res101.pth")
_NO_SLIDERS: tuple[Slider | None, Slider | None] = (None, None)


_SEGMENTATION_UNSUPPORTED = (
    "Segmentation (OneFormer/UniFormer) is not supported in this version of SD Studio. Make the "
    "segmentation map with another tool and use it with the 'none' preprocessor."
)


def _annotator(
    api_name: str,
    label: str,
    files: tuple[AnnotatorFile, ...],
    *,
    priority: int = 0,
    sliders: tuple[Slider | None, Slider | None] = _NO_SLIDERS,
    run: AnnotatorFunction | None = None,
    unsupported: str = "",
) -> Preprocessor:
    return Preprocessor(
        api_name,
        label,
        RESOLUTION,
        *sliders,
        annotator_files=files,
        priority=priority,
        run_network=run,
        unsupported=unsupported,
    )


PREPROCESSORS: Mapping[str, Preprocessor] = MappingProxyType(
    {
        "none": Preprocessor("none", "none", RESOLUTION, run=_run_none, priority=10),
        "invert": Preprocessor(
            "invert", "invert (from white bg & black line)", None, run=_run_invert, priority=20
        ),
        "canny": Preprocessor(
            "canny",
            "canny",
            RESOLUTION,
            Slider("Low Threshold", 1, 255, 100, 1),
            Slider("High Threshold", 1, 255, 200, 1),
            run=_run_canny,
            priority=100,
        ),
        "threshold": Preprocessor(
            "threshold",
            "threshold",
            RESOLUTION,
            Slider("Binarization Threshold", 0, 255, 127),
            run=_run_threshold,
        ),
        "scribble_xdog": Preprocessor(
            "scribble_xdog",
            "scribble_xdog",
            RESOLUTION,
            Slider("XDoG Threshold", 1, 64, 32),
            run=_run_scribble_xdog,
        ),
        "tile_resample": Preprocessor(
            "tile_resample",
            "tile_resample",
            RESOLUTION,
            Slider("Down Sampling Rate", 1.0, 8.0, 1.0),
            run=_run_tile_resample,
            priority=100,
        ),
        "blur_gaussian": Preprocessor(
            "blur_gaussian",
            "blur_gaussian",
            RESOLUTION,
            Slider("Sigma", 0.01, 64.0, 9.0),
            run=_run_blur_gaussian,
        ),
        "lineart_standard": Preprocessor(
            "lineart_standard",
            "lineart_standard (from white bg & black line)",
            RESOLUTION,
            run=_run_lineart_standard,
            priority=100,
        ),
        "depth_midas": _annotator(
            "depth", "depth_midas", (_MIDAS,), priority=100, run=annotators_module.run_depth_midas
        ),
        "depth_leres": _annotator(
            "depth_leres",
            "depth_leres",
            (_LERES,),
            sliders=(Slider("Remove Near %", 0, 100, 0, 0.1), Slider("Remove Background %", 0, 100, 0, 0.1)),
            run=annotators_module.run_depth_leres,
        ),
        "depth_leres++": _annotator(
            "depth_leres++",
            "depth_leres++",
            (_LERES, AnnotatorFile("latest_net_G.pth", "leres", _ANNOTATORS_HF + "latest_net_G.pth")),
            sliders=(Slider("Remove Near %", 0, 100, 0, 0.1), Slider("Remove Background %", 0, 100, 0, 0.1)),
            run=annotators_module.run_depth_leres_boost,
        ),
        "depth_zoe": _annotator(
            "depth_zoe",
            "depth_zoe",
            (AnnotatorFile("ZoeD_M12_N.pt", "zoedepth", _ANNOTATORS_HF + "ZoeD_M12_N.pt"),),
            run=annotators_module.run_depth_zoe,
        ),
        "normal_bae": _annotator(
            "normal_bae",
            "normal_bae",
            (AnnotatorFile("scannet.pt", "normal_bae", _ANNOTATORS_HF + "scannet.pt"),),
            priority=100,
            run=annotators_module.run_normal_bae,
        ),
        "normal_midas": _annotator(
            "normal_map",
            "normal_midas",
            (_MIDAS,),
            sliders=(Slider("Normal Background Threshold", 0.0, 1.0, 0.4), None),
            run=annotators_module.run_normal_midas,
        ),
        "openpose": _annotator("openpose", "openpose", (_BODY,), run=annotators_module.run_openpose),
        "openpose_face": _annotator(
            "openpose_face", "openpose_face", (_BODY, _FACE), run=annotators_module.run_openpose_face
        ),
        "openpose_hand": _annotator(
            "openpose_hand", "openpose_hand", (_BODY, _HAND), run=annotators_module.run_openpose_hand
        ),
        "openpose_full": _annotator(
            "openpose_full",
            "openpose_full",
            (_BODY, _HAND, _FACE),
            priority=100,
            run=annotators_module.run_openpose_full,
        ),
        "dw_openpose_full": _annotator(
            "dw_openpose_full",
            "dw_openpose_full",
            (
                AnnotatorFile(
                    "yolox_l.onnx",
                    "openpose",
                    "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx",
                ),
                AnnotatorFile(
                    "dw-ll_ucoco_384.onnx",
                    "openpose",
                    "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
                ),
            ),
            unsupported=(
                "DWPose is not supported in this version of SD Studio (its ONNX models need a runtime "
                "SD Studio does not ship). Use 'openpose_full', or make the pose image with another "
                "tool and use it with the 'none' preprocessor."
            ),
        ),
        "lineart_realistic": _annotator(
            "lineart",
            "lineart_realistic",
            (AnnotatorFile("sk_model.pth", "lineart", _ANNOTATORS_HF + "sk_model.pth"),),
            run=annotators_module.run_lineart,
        ),
        "lineart_coarse": _annotator(
            "lineart_coarse",
            "lineart_coarse",
            (AnnotatorFile("sk_model2.pth", "lineart", _ANNOTATORS_HF + "sk_model2.pth"),),
            run=annotators_module.run_lineart,
        ),
        "lineart_anime": _annotator(
            "lineart_anime",
            "lineart_anime",
            (AnnotatorFile("netG.pth", "lineart_anime", _ANNOTATORS_HF + "netG.pth"),),
            run=annotators_module.run_lineart_anime,
        ),
        "softedge_hed": _annotator("hed", "softedge_hed", (_HED,), run=annotators_module.run_hed),
        "softedge_hedsafe": _annotator(
            "hed_safe", "softedge_hedsafe", (_HED,), run=annotators_module.run_hed_safe
        ),
        "softedge_pidinet": _annotator(
            "pidinet", "softedge_pidinet", (_PIDINET,), priority=100, run=annotators_module.run_pidinet
        ),
        "softedge_pidisafe": _annotator(
            "pidinet_safe", "softedge_pidisafe", (_PIDINET,), run=annotators_module.run_pidinet_safe
        ),
        "scribble_hed": _annotator(
            "scribble_hed", "scribble_hed", (_HED,), run=annotators_module.run_scribble_hed
        ),
        "scribble_pidinet": _annotator(
            "pidinet_scribble",
            "scribble_pidinet",
            (_PIDINET,),
            priority=100,
            run=annotators_module.run_scribble_pidinet,
        ),
        "mlsd": _annotator(
            "mlsd",
            "mlsd",
            (
                AnnotatorFile(
                    "mlsd_large_512_fp32.pth", "mlsd", _CONTROLNET_CKPTS + "mlsd_large_512_fp32.pth"
                ),
            ),
            priority=100,
            sliders=(
                Slider("MLSD Value Threshold", 0.01, 2.0, 0.1),
                Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1),
            ),
            run=annotators_module.run_mlsd,
        ),
        "seg_ofade20k": _annotator(
            "oneformer_ade20k",
            "seg_ofade20k",
            (
                AnnotatorFile(
                    "250_16_swin_l_oneformer_ade20k_160k.pth",
                    "oneformer",
                    _ANNOTATORS_HF + "250_16_swin_l_oneformer_ade20k_160k.pth",
                ),
            ),
            priority=100,
            unsupported=_SEGMENTATION_UNSUPPORTED,
        ),
        "seg_ofcoco": _annotator(
            "oneformer_coco",
            "seg_ofcoco",
            (
                AnnotatorFile(
                    "150_16_swin_l_oneformer_coco_100ep.pth",
                    "oneformer",
                    _ANNOTATORS_HF + "150_16_swin_l_oneformer_coco_100ep.pth",
                ),
            ),
            unsupported=_SEGMENTATION_UNSUPPORTED,
        ),
        "seg_ufade20k": _annotator(
            "segmentation",
            "seg_ufade20k",
            (
                AnnotatorFile(
                    "upernet_global_small.pth", "uniformer", _CONTROLNET_CKPTS + "upernet_global_small.pth"
                ),
            ),
            unsupported=_SEGMENTATION_UNSUPPORTED,
        ),
    }
)
"""Preprocessors keyed by the name the extension's UI shows (``depth_midas``, ``softedge_hed``...);
:func:`resolve_preprocessor` also accepts the extension's internal API names (``depth``, ``hed``...)
and full labels."""


def resolve_preprocessor(name: str) -> tuple[str, Preprocessor]:
    """``(key, preprocessor)`` for a table key, API name or label (case-insensitive)."""
    try:
        key = resolve_preprocessor_name(name)
    except ValueError as exc:
        raise ControlNetError(str(exc)) from None
    return key, PREPROCESSORS[key]


def _sorted_preprocessors() -> list[Preprocessor]:
    """The extension's order: ``none`` first, then by priority and label, descending."""
    rest = [p for key, p in PREPROCESSORS.items() if key != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    return [PREPROCESSORS["none"], *rest]


def preprocessor_catalogue(*, alias_names: bool = False) -> dict[str, Any]:
    """The extension's ``GET /controlnet/module_list``: ``{"module_list": [...], "module_detail":
    {name: {"model_free": bool, "sliders": [...]}}}`` with API names, or UI labels when
    ``alias_names`` (the endpoint's query parameter of the same name)."""
    modules: list[str] = []
    details: dict[str, Any] = {}
    for preprocessor in _sorted_preprocessors():
        name = preprocessor.label if alias_names else preprocessor.api_name
        modules.append(name)
        sliders = [s for s in (preprocessor.resolution, preprocessor.slider_1, preprocessor.slider_2) if s]
        details[name] = {"model_free": preprocessor.model_free, "sliders": [s.api_json() for s in sliders]}
    return {"module_list": modules, "module_detail": details}


def _annotator_dirs(annotator_dir: Path | Sequence[Path] | None) -> list[Path]:
    if annotator_dir is None:
        return []
    if isinstance(annotator_dir, Path):
        return [annotator_dir]
    return [Path(p) for p in annotator_dir]


def default_annotator_dirs(models_root: Path) -> list[Path]:
    """Where annotator weights are looked for: ``models/ControlNet/annotators`` and ``models/annotators``
    (each file directly in the folder or in the extension's per-annotator subfolder)."""
    return [models_root / "ControlNet" / ANNOTATOR_FOLDER, models_root / ANNOTATOR_FOLDER]


def find_annotator_files(
    preprocessor: Preprocessor, annotator_dir: Path | Sequence[Path] | None
) -> list[Path]:
    """The annotator weight files of ``preprocessor``; raises :class:`AnnotatorMissingError` naming the
    first missing file, the folders searched and the download address."""
    folders = _annotator_dirs(annotator_dir)
    found = []
    for needed in preprocessor.annotator_files:
        candidates = [folder / needed.filename for folder in folders] + [
            folder / needed.subfolder / needed.filename for folder in folders
        ]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            where = " or ".join(str(f) for f in folders) if folders else "models/ControlNet/annotators"
            raise AnnotatorMissingError(
                f"The '{preprocessor.label}' preprocessor needs {needed.filename}, which is not in {where} "
                f"(also checked its '{needed.subfolder}/' subfolder). Download it from {needed.url} and "
                "put it there, or prepare the control image elsewhere and use the 'none' preprocessor."
            )
        found.append(path)
    return found


def run_preprocessor(
    name: str,
    image: Image.Image | np.ndarray,
    *,
    resolution: int = -1,
    threshold_a: float = -1,
    threshold_b: float = -1,
    annotator_dir: Path | Sequence[Path] | None = None,
    annotators: AnnotatorCache | None = None,
) -> Image.Image:
    """Run a preprocessor on an image and return the detected map (RGB).

    ``resolution`` is the extension's ``processor_res`` (the short side the preprocessor works
    at): ``0`` or less (the API's ``-1``) means the default, 512; a positive value is used as
    given, so a "Pixel Perfect" value from :func:`pixel_perfect_resolution` previews exactly what
    the job will use. Thresholds outside their slider's range mean the slider's default, as in
    the extension. Model-based annotators check for their weight files first; ``annotators`` keeps
    their loaded networks for the next call (without one they are loaded for this call only).
    """
    _, preprocessor = resolve_preprocessor(name)
    default = int(preprocessor.resolution.value) if preprocessor.resolution else 512
    res = int(resolution) if resolution > 0 else default
    return _detect(preprocessor, image, res, threshold_a, threshold_b, annotator_dir, annotators)


def _detect(
    preprocessor: Preprocessor,
    image: Image.Image | np.ndarray,
    resolution: int,
    threshold_a: float,
    threshold_b: float,
    annotator_dir: Path | Sequence[Path] | None,
    annotators: AnnotatorCache | None = None,
) -> Image.Image:
    """Run with ``resolution`` as given (pixel-perfect values may lie outside the slider's range,
    which the extension allows too)."""
    import numpy as np
    from PIL import Image as PILImage

    if preprocessor.run is None and preprocessor.run_network is None:
        raise ControlNetError(
            f"'{preprocessor.label}': {preprocessor.unsupported}"
            if preprocessor.unsupported
            else f"The '{preprocessor.label}' preprocessor is not supported in this version of SD Studio. "
            "Prepare the control image with another tool and use the 'none' preprocessor."
        )
    files = find_annotator_files(preprocessor, annotator_dir)
    pixels = _image_to_array(image)
    a = preprocessor.slider_1.clamp_or_default(threshold_a) if preprocessor.slider_1 else threshold_a
    b = preprocessor.slider_2.clamp_or_default(threshold_b) if preprocessor.slider_2 else threshold_b
    if preprocessor.run_network is not None:
        cache = annotators if annotators is not None else annotators_module.AnnotatorCache()
        try:
            result = preprocessor.run_network(pixels, max(1, resolution), a, b, files, cache)
        except AnnotatorLoadError as exc:
            urls = [f.url for f in preprocessor.annotator_files if f.filename == exc.filename]
            where = f" Download it again from {urls[0]}." if urls else ""
            raise AnnotatorLoadError(
                exc.filename, f"The '{preprocessor.label}' preprocessor cannot use {exc}{where}"
            ) from exc
    else:
        assert preprocessor.run is not None
        result = preprocessor.run(pixels, max(1, resolution), a, b)
    return PILImage.fromarray(_hwc3(np.asarray(result)), mode="RGB")


def _image_to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    import numpy as np

    if isinstance(image, np.ndarray):
        return _hwc3(image)
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "P" else "RGB")
    return _hwc3(np.asarray(image))


# ============================================================================================
# Resizing control images to the generation size
# ============================================================================================


def pixel_perfect_resolution(
    image_height: int, image_width: int, *, width: int, height: int, resize_mode: str
) -> int:
    """The extension's "Pixel Perfect" preprocessor resolution: the short side the image will have
    once fitted to the target (by the smaller scale for "Resize and Fill", the larger otherwise)."""
    scale_h = float(height) / float(image_height)
    scale_w = float(width) / float(image_width)
    scale = min(scale_h, scale_w) if resize_mode == "Resize and Fill" else max(scale_h, scale_w)
    return round(scale * min(image_height, image_width))


def _resize_map(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a detected map the careful way: nearest for label maps (segmentation), area when
    shrinking, cubic when enlarging; two-tone line art is re-binarised so edges stay crisp."""
    import cv2
    import numpy as np

    if image.shape[0] == height and image.shape[1] == width:
        return image
    colors = np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0]
    is_binary = colors == 2 and image.min() < 16 and image.max() > 240
    shrinking = width * height < image.shape[0] * image.shape[1]
    if 2 < colors < 200:
        interpolation = cv2.INTER_NEAREST
    elif shrinking:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    resized = cv2.resize(image, (width, height), interpolation=interpolation)
    if is_binary:
        grey = resized.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        resized = np.stack([grey] * 3, axis=2)
    return resized


def resize_control_image(image: np.ndarray, *, width: int, height: int, resize_mode: str) -> np.ndarray:
    """Fit a detected map to the generation size by the unit's resize mode.

    ``Just Resize`` stretches; ``Crop and Resize`` scales to cover and crops the centre;
    ``Resize and Fill`` scales to fit and pads with the median border colour.
    """
    import numpy as np

    image = _hwc3(image)
    if resize_mode == "Just Resize":
        return _resize_map(image, width, height)
    old_h, old_w = image.shape[:2]
    scale_h, scale_w = height / old_h, width / old_w
    if resize_mode == "Resize and Fill":
        scale = min(scale_h, scale_w)
        borders = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
        background = np.tile(np.median(borders, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        fitted = _resize_map(image, max(1, round(old_w * scale)), max(1, round(old_h * scale)))
        new_h, new_w = fitted.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        background[top : top + new_h, left : left + new_w] = fitted[:height, :width]
        return background
    scale = max(scale_h, scale_w)
    covered = _resize_map(image, max(width, round(old_w * scale)), max(height, round(old_h * scale)))
    new_h, new_w = covered.shape[:2]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(covered[top : top + height, left : left + width])


# ============================================================================================
# Model files
# ============================================================================================


def _is_diffusers_controlnet(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "ControlNet" in str(data.get("_class_name", ""))


def list_controlnet_paths(controlnet_dir: Path) -> list[Path]:
    """ControlNet files and diffusers folders under ``controlnet_dir`` (not the annotators folder,
    not the files inside a diffusers folder), sorted by name as the extension sorts them."""
    if not controlnet_dir.is_dir():
        return []
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if folder == controlnet_dir and entry.name.lower() == ANNOTATOR_FOLDER:
                    continue
                if _is_diffusers_controlnet(entry):
                    found.append(entry)
                else:
                    walk(entry)
            elif entry.suffix.lower() in CONTROLNET_SUFFIXES:
                found.append(entry)

    walk(controlnet_dir)
    return sorted(found, key=lambda p: p.name.lower())


def _model_stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _weights_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def legacy_model_hash(path: Path) -> str:
    """A1111's old short model hash (sha256 of 64 KiB at offset 1 MiB, 8 hex digits), which the
    extension shows after ControlNet model names: ``control_v11p_sd15_canny [d14c016b]``."""
    weights = _weights_file(path)
    if weights is None:
        return "00000000"
    digest = hashlib.sha256()
    with weights.open("rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]


def model_title(path: Path) -> str:
    return f"{_model_stem(path)} [{legacy_model_hash(path)}]"


def model_catalogue(controlnet_dir: Path) -> dict[str, list[str]]:
    """The extension's ``GET /controlnet/model_list``: ``{"model_list": ["name [hash]", ...]}``."""
    return {"model_list": [model_title(path) for path in list_controlnet_paths(controlnet_dir)]}


def find_controlnet(controlnet_dir: Path, name: str) -> Path:
    """Resolve a unit's ``model`` (``name``, ``name [hash]``, a file name or ``sub/name``)."""
    paths = list_controlnet_paths(controlnet_dir)
    wanted = re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", name.strip()).replace("\\", "/")
    for suffix in CONTROLNET_SUFFIXES:
        if wanted.lower().endswith(suffix):
            wanted = wanted[: -len(suffix)]
            break

    def relative(path: Path) -> str:
        rel = path.relative_to(controlnet_dir)
        return rel.as_posix() if path.is_dir() else rel.with_suffix("").as_posix()

    for exact in (True, False):
        for path in paths:
            candidates = (_model_stem(path), relative(path))
            if any(c == wanted if exact else c.lower() == wanted.lower() for c in candidates):
                return path
    stems = [_model_stem(p) for p in paths]
    close = difflib.get_close_matches(wanted, stems, n=5, cutoff=0.5)
    hint = (
        f"Close names: {', '.join(close)}."
        if close
        else (
            f"Available: {', '.join(stems[:15])}."
            if stems
            else f"{controlnet_dir} has no ControlNet models yet."
        )
    )
    raise ControlNetNotFoundError(
        f"ControlNet model '{name}' not found in {controlnet_dir}. {hint} Put the .safetensors file (or "
        "diffusers folder) there."
    )


# ============================================================================================
# Loading
# ============================================================================================


@dataclass
class LoadedControlNet:
    """A ControlNet in memory with the family it was made for."""

    name: str
    path: Path
    model: Any  # diffusers ControlNetModel
    base: str  # "sd1" | "sd2" | "sdxl"

    @property
    def family_label(self) -> str:
        return _BASE_LABELS.get(self.base, self.base)


def base_from_config(config: Mapping[str, Any]) -> str:
    """Which model family a ControlNet config belongs to: SDXL ones have the ``text_time``
    addition embedding (or 2048-wide context); SD2's are 1024-wide with linear projections; SD1's
    768-wide. Unusual widths (tiny test models) fall back to the structural signs."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    width = config.get("cross_attention_dim")
    if isinstance(width, int) and width in _CONTEXT_WIDTH_BASES:
        return _CONTEXT_WIDTH_BASES[width]
    return "sd2" if config.get("use_linear_projection") else "sd1"


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "control_model."
    if any(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return dict(state_dict)


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state_dict if (m := regex.match(key))})


def _yaml_control_params(original_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not original_config:
        return {}
    params = ((original_config.get("model") or {}).get("params") or {}).get("control_stage_config") or {}
    return dict(params.get("params") or {})


def controlnet_config_from_ldm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    original_config: Mapping[str, Any] | None = None,
    name: str = "controlnet",
) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` config for an original-layout (``cldm``) state dict.

    Sizes come from the tensor shapes. Attention heads are invisible in the weights: a sidecar
    yaml's ``num_heads``/``num_head_channels`` decides, else the family default (8 heads for SD1,
    64-channel heads for SD2/SDXL).
    """
    sd = state_dict
    if "input_hint_block.0.weight" not in sd or "time_embed.0.weight" not in sd:
        raise CheckpointLoadError(
            f"{name}: not an original-layout ControlNet (no input_hint_block / time_embed)."
        )
    hint = _indices(sd, r"input_hint_block\.(\d+)\.weight$")
    blocks = _indices(sd, r"input_blocks\.(\d+)\.")
    downsamplers = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downsamplers) + 1
    layers_per_block = (len(blocks) - 1 - len(downsamplers)) // levels
    block_out: list[int] = []
    down_types: list[str] = []
    depths: list[int] = []
    index = 1
    for level in range(levels):
        first = index
        block_out.append(int(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        has_attention = f"input_blocks.{first}.1.proj_in.weight" in sd
        down_types.append("CrossAttnDownBlock2D" if has_attention else "DownBlock2D")
        depths.append(len(_indices(sd, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) or 1)
        index += layers_per_block + (1 if level < levels - 1 else 0)
    attention_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
    if not attention_keys:
        raise CheckpointLoadError(f"{name}: ControlNet without cross-attention layers is not supported.")
    context_dim = int(sd[attention_keys[0]].shape[1])
    linear = sd[next(k for k in sd if k.endswith("1.proj_in.weight"))].ndim == 2
    mid_depth = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    transformer_depths = [*depths[:-1], mid_depth or depths[-1]] if mid_depth else depths
    conditioning = [int(sd[f"input_hint_block.{hint[0]}.weight"].shape[0])] + [
        int(sd[f"input_hint_block.{hint[i]}.weight"].shape[0]) for i in range(2, len(hint) - 1, 2)
    ]
    addition: dict[str, Any] = {}
    if "label_emb.0.0.weight" in sd:
        addition = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": int(sd["label_emb.0.0.weight"].shape[1]),
        }
    config: dict[str, Any] = {
        "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]),
        "conditioning_channels": int(sd["input_hint_block.0.weight"].shape[1]),
        "down_block_types": down_types,
        "block_out_channels": block_out,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": transformer_depths,
        "use_linear_projection": linear,
        "conditioning_embedding_out_channels": conditioning,
        "norm_num_groups": 32,
        **addition,
    }
    base = base_from_config(config)
    params = _yaml_control_params(original_config)
    heads = params.get("num_heads", -1)
    head_channels = params.get("num_head_channels", -1)
    if isinstance(heads, int) and heads > 0:
        config["attention_head_dim"] = heads
    elif isinstance(head_channels, int) and head_channels > 0:
        config["attention_head_dim"] = [max(1, c // head_channels) for c in block_out]
    elif base == "sd1":
        config["attention_head_dim"] = 8
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in block_out]
    config["global_pool_conditions"] = (
        bool(params.get("global_average_pooling", False)) or "shuffle" in name.lower()
    )
    return config


def _convert_ldm_controlnet(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys: diffusers' converter for the encoder, our own mapping for
    the hint (conditioning) encoder, whose conv_out diffusers assumes to be at index 14 (true for
    the standard four-stage encoder only), and for SDXL's ``label_emb``."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(dict(sd), {"layers_per_block": config["layers_per_block"]})
    result = {
        key: value
        for key, value in converted.items()
        if value is not None and not key.startswith("controlnet_cond_embedding.")
    }
    hint = _indices(sd, r"input_hint_block\.(\d+)\.weight$")
    targets = ["conv_in"] + [f"blocks.{i}" for i in range(len(hint) - 2)] + ["conv_out"]
    for index, target in zip(hint, targets, strict=True):
        for kind in ("weight", "bias"):
            result[f"controlnet_cond_embedding.{target}.{kind}"] = sd[f"input_hint_block.{index}.{kind}"]
    for source, target in (
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
    ):
        for kind in ("weight", "bias"):
            if f"{source}.{kind}" in sd:
                result[f"{target}.{kind}"] = sd[f"{source}.{kind}"]
    return result


def _read_sidecar_yaml(path: Path) -> dict[str, Any] | None:
    import yaml

    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    try:
        data = yaml.safe_load(sidecar.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ControlNetError(f"{sidecar.name}: cannot read this yaml config ({exc}).") from exc
    return data if isinstance(data, dict) else None


def load_controlnet_file(path: Path) -> tuple[Any, str]:
    """Load a single-file ControlNet in the original layout; returns ``(ControlNetModel, base)``."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    from pipelines.models.checkpoint_loader import read_state_dict

    try:
        raw = read_state_dict(path)
    except CheckpointLoadError as exc:
        raise ControlNetError(f"ControlNet {exc}") from exc
    sd = _strip_prefix(raw)
    if "input_hint_block.0.weight" not in sd:
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            reason = (
                "it holds diffusers-format weights without their config; put it in a folder together with "
                "its config.json (a diffusers ControlNet folder)"
            )
        elif any("lora" in key for key in sd):
            reason = "it looks like a Control-LoRA, which is not supported yet"
        else:
            reason = (
                "it is not a ControlNet (T2I-Adapters, IP-Adapters and ControlLLLite are not supported yet)"
            )
        raise ControlNetError(f"ControlNet {path.name} cannot be loaded: {reason}.")
    try:
        config = controlnet_config_from_ldm(sd, original_config=_read_sidecar_yaml(path), name=path.stem)
        converted = _convert_ldm_controlnet(sd, config)
    except (KeyError, IndexError, StopIteration, CheckpointLoadError) as exc:
        raise ControlNetError(
            f"ControlNet {path.name}: unrecognised layout ({type(exc).__name__}: {exc}). It may be damaged "
            "or a model type SD Studio does not support yet."
        ) from exc
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or (f"wrong shape {wrong[:3]}")
        )
        raise ControlNetError(
            f"ControlNet {path.name}: the weights do not form a standard ControlNet ({detail}). Add the "
            "matching .yaml config next to it, or use a diffusers-format folder."
        )
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True, assign=True)
    model.eval()
    return model, base_from_config(config)


def load_controlnet_folder(path: Path) -> tuple[Any, str]:
    """Load a diffusers ControlNet folder (offline); returns ``(ControlNetModel, base)``."""
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ControlNetError(f"ControlNet folder {path.name}: cannot load it ({exc}).") from exc
    model.eval()
    return model, base_from_config(dict(model.config))


def load_controlnet(path: Path) -> LoadedControlNet:
    model, base = load_controlnet_folder(path) if path.is_dir() else load_controlnet_file(path)
    return LoadedControlNet(name=_model_stem(path), path=path, model=model, base=base)


def _family_base(family: ModelFamily | str) -> str:
    return family if isinstance(family, str) else family.base


def check_controlnet_family(loaded: LoadedControlNet, family: ModelFamily | str) -> None:
    """Raise :class:`ControlNetFamilyError` when the ControlNet does not fit the checkpoint."""
    base = _family_base(family)
    if loaded.base != base:
        checkpoint = family.label if not isinstance(family, str) else _BASE_LABELS.get(base, base)
        raise ControlNetFamilyError(
            f"ControlNet {loaded.name} is for {loaded.family_label} but the loaded checkpoint is "
            f"{checkpoint}. Pick a ControlNet made for {checkpoint} (or switch the checkpoint)."
        )


class ControlNetCache:
    """Loaded ControlNet models, least recently used dropped first. One per engine (no globals);
    thread-safe. ``capacity`` counts models (an SD1.5 ControlNet is ~0.7 GB in fp16, SDXL ~2.5 GB)."""

    def __init__(self, controlnet_dir: Path, *, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("ControlNetCache capacity must be at least 1.")
        self.controlnet_dir = controlnet_dir
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, int], LoadedControlNet] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._models)

    def find(self, name: str) -> Path:
        return find_controlnet(self.controlnet_dir, name)

    def get(self, name: str, *, device: Any = None, dtype: Any = None) -> LoadedControlNet:
        """The named model, loaded on first use and moved to ``device``/``dtype`` when given."""
        path = self.find(name)
        stamp = (path / "config.json") if path.is_dir() else path
        key = (str(path.resolve()), stamp.stat().st_mtime_ns)
        with self._lock:
            loaded = self._models.get(key)
            if loaded is not None:
                self._models.move_to_end(key)
        if loaded is None:
            loaded = load_controlnet(path)
            log.info("loaded ControlNet %s (%s)", loaded.name, loaded.family_label)
            with self._lock:
                self._models[key] = loaded
                self._models.move_to_end(key)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        if device is not None or dtype is not None:
            loaded.model.to(device=device, dtype=dtype)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


# ============================================================================================
# Units
# ============================================================================================


def load_unit_image(
    value: str, *, image_dirs: Sequence[Path] | None = None, label: str = "ControlNet unit"
) -> Image.Image:
    """Decode a unit's ``image``: an existing file path (restricted to ``image_dirs`` when given,
    e.g. for requests from the network) or base64 data, with or without a ``data:`` prefix."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    text = value.strip()
    if len(text) < 4096 and "\n" not in text and not text.startswith("data:"):
        candidate = Path(text).expanduser()
        try:
            is_file = candidate.is_file()
        except OSError:
            is_file = False
        if is_file:
            if image_dirs is not None:
                resolved = candidate.resolve()
                if not any(resolved.is_relative_to(Path(d).resolve()) for d in image_dirs):
                    raise ControlNetError(f"{label}: image path {text} is outside the allowed folders.")
            try:
                with PILImage.open(candidate) as opened:
                    opened.load()
                    return opened.copy()
            except (OSError, UnidentifiedImageError) as exc:
                raise ControlNetError(f"{label}: {candidate.name} is not a readable image ({exc}).") from exc
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=False)
        with PILImage.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.copy()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:
        raise ControlNetError(
            f"{label}: image is neither an existing file nor base64-encoded image data."
        ) from exc


# ============================================================================================
# Pipeline inputs
# ============================================================================================


def soft_injection_scales(count: int) -> list[float]:
    """The extension's per-residual factors for "soft injection": the first ``count`` of
    ``0.825 ** (12 - i)`` for ``i`` in 0..12 (SD: all 13, SDXL: the first 10)."""
    scales = [SOFT_INJECTION_BASE ** float(12 - i) for i in range(13)]
    return (scales + [1.0] * max(0, count - 13))[:count]


@functools.cache
def _control_mode_adapter_class() -> type:
    """Built on first use so that importing this module does not import torch."""
    import torch
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    class ControlModeAdapter(torch.nn.Module):
        """Wraps one unit's ControlNetModel inside a ``MultiControlNetModel`` to give it the
        extension's per-unit control mode: soft per-layer weights, and for "ControlNet is more
        important" control on the conditional half of the CFG batch only (the unconditional half
        gets zero residuals, as diffusers' guess mode does for all units at once)."""

        def __init__(
            self, controlnet: Any, *, soft: bool, cond_only: bool, classifier_free_guidance: bool
        ) -> None:
            super().__init__()
            self.controlnet = controlnet
            self.soft = soft
            self.cond_only = cond_only
            self.classifier_free_guidance = classifier_free_guidance

        @property
        def config(self) -> Any:  # the pipeline reads nets[i].config.global_pool_conditions
            return self.controlnet.config

        def forward(
            self,
            sample: torch.Tensor,
            timestep: Any,
            encoder_hidden_states: torch.Tensor,
            controlnet_cond: torch.Tensor,
            conditioning_scale: float = 1.0,
            class_labels: Any = None,
            timestep_cond: Any = None,
            attention_mask: Any = None,
            added_cond_kwargs: dict[str, Any] | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            guess_mode: bool = False,
            return_dict: bool = True,
        ) -> Any:
            batch = sample.shape[0]
            # In guess mode the pipeline already passes the conditional half only.
            split = self.cond_only and self.classifier_free_guidance and not guess_mode and batch % 2 == 0
            half = batch // 2

            def conditional(value: Any) -> Any:
                if split and isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                    return value[half:]
                return value

            down, mid = self.controlnet(
                conditional(sample),
                conditional(timestep),
                encoder_hidden_states=conditional(encoder_hidden_states),
                controlnet_cond=conditional(controlnet_cond),
                conditioning_scale=conditioning_scale,
                class_labels=conditional(class_labels),
                timestep_cond=conditional(timestep_cond),
                attention_mask=conditional(attention_mask),
                added_cond_kwargs=(
                    {k: conditional(v) for k, v in added_cond_kwargs.items()}
                    if added_cond_kwargs
                    else added_cond_kwargs
                ),
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if self.soft:
                scales = soft_injection_scales(len(down) + 1)
                down = [residual * scale for residual, scale in zip(down, scales, strict=False)]
                mid = mid * scales[len(down)]
            if split:
                down = [torch.cat([torch.zeros_like(r), r]) for r in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            if not return_dict:
                return down, mid
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    return ControlModeAdapter


def wrap_for_control_mode(
    controlnet: Any, control_mode: str, *, classifier_free_guidance: bool = True
) -> Any:
    """``controlnet`` itself for "Balanced", else a :class:`ControlModeAdapter` around it."""
    if control_mode == "Balanced":
        return controlnet
    adapter = _control_mode_adapter_class()
    return adapter(
        controlnet,
        soft=True,
        cond_only=control_mode == "ControlNet is more important",
        classifier_free_guidance=classifier_free_guidance,
    )


@dataclass
class ControlInputs:
    """What a diffusers ControlNet pipeline needs for one job, one entry per enabled unit."""

    controlnet: Any  # ControlNetModel (one Balanced unit) or MultiControlNetModel
    images: list[Image.Image]
    conditioning_scale: list[float]
    guidance_start: list[float]
    guidance_end: list[float]
    guess_mode: bool
    units: list[ControlNetUnit] = field(default_factory=list)
    models: list[LoadedControlNet] = field(default_factory=list)
    detected_maps: list[Image.Image] = field(default_factory=list)
    """The preprocessor outputs before fitting to the generation size (the extension returns
    these to API clients as "detected maps")."""

    def pipeline_kwargs(self, mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img") -> dict[str, Any]:
        """Keyword arguments for the pipeline call (the ``controlnet`` itself goes to the pipeline's
        constructor; see :func:`build_controlnet_pipeline`). diffusers' img2img and inpaint
        ControlNet pipelines take the control image as ``control_image`` (``image`` is the init
        image there)."""
        single = len(self.images) == 1 and not hasattr(self.controlnet, "nets")
        image_key = "image" if mode == "txt2img" else "control_image"
        return {
            image_key: self.images[0] if single else list(self.images),
            "controlnet_conditioning_scale": self.conditioning_scale[0]
            if single
            else list(self.conditioning_scale),
            "control_guidance_start": list(self.guidance_start),
            "control_guidance_end": list(self.guidance_end),
            "guess_mode": self.guess_mode,
        }


def prepare_control_inputs(
    units: Sequence[ControlNetUnit],
    controlnet_cache: ControlNetCache,
    *,
    width: int,
    height: int,
    family: ModelFamily | str,
    annotator_dir: Path | Sequence[Path] | None = None,
    image_dirs: Sequence[Path] | None = None,
    fallback_image: Image.Image | None = None,
    device: Any = None,
    dtype: Any = None,
    classifier_free_guidance: bool = True,
    annotators: AnnotatorCache | None = None,
) -> ControlInputs | None:
    """Preprocess each enabled unit's image, fit it to ``width`` x ``height``, load its model and
    assemble the pipeline inputs. ``None`` when no unit is enabled.

    ``annotators`` holds the preprocessors' loaded networks between jobs (the engine's cache).

    ``fallback_image`` is used by units without an image (the extension uses the img2img input).
    ``classifier_free_guidance`` must say whether the job uses CFG (cfg_scale > 1): it decides how
    "ControlNet is more important" is applied. Models are moved to ``device``/``dtype``.
    """
    import numpy as np
    from PIL import Image as PILImage

    enabled = [(index, unit) for index, unit in enumerate(units) if unit.enabled]
    if not enabled:
        return None
    base = _family_base(family)
    images: list[Image.Image] = []
    detected_maps: list[Image.Image] = []
    models: list[LoadedControlNet] = []
    for index, unit in enabled:
        label = f"ControlNet Unit {index}"
        if not unit.uses_model:
            raise ControlNetError(
                f"{label}: no model selected. Choose one from models/ControlNet (field 'model')."
            )
        if unit.image:
            source = load_unit_image(unit.image, image_dirs=image_dirs, label=label)
        elif fallback_image is not None:
            source = fallback_image
        else:
            raise ControlNetError(
                f"{label}: no control image (field 'image'). Upload one or give a file path."
            )
        pixels = _image_to_array(source)
        _, preprocessor = resolve_preprocessor(unit.module)
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(
                pixels.shape[0], pixels.shape[1], width=width, height=height, resize_mode=unit.resize_mode
            )
        elif preprocessor.resolution is not None:
            resolution = int(preprocessor.resolution.clamp_or_default(unit.processor_res))
        else:
            resolution = 512
        detected = _detect(
            preprocessor, pixels, resolution, unit.threshold_a, unit.threshold_b, annotator_dir, annotators
        )
        fitted = resize_control_image(
            np.asarray(detected), width=width, height=height, resize_mode=unit.resize_mode
        )
        detected_maps.append(detected)
        images.append(PILImage.fromarray(fitted, mode="RGB"))
        try:
            loaded = controlnet_cache.get(unit.model, device=device, dtype=dtype)
            check_controlnet_family(loaded, family)
        except ControlNetError as exc:
            raise type(exc)(f"{label}: {exc}") from exc
        models.append(loaded)

    modes = [unit.control_mode for _, unit in enabled]
    guess_mode = all(m == "ControlNet is more important" for m in modes) and base in ("sd1", "sd2")
    if guess_mode or all(m == "Balanced" for m in modes):
        nets = [loaded.model for loaded in models]
    else:
        nets = [
            wrap_for_control_mode(loaded.model, mode, classifier_free_guidance=classifier_free_guidance)
            for loaded, mode in zip(models, modes, strict=True)
        ]
    if len(nets) == 1 and nets[0] is models[0].model:
        controlnet: Any = nets[0]
    else:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        controlnet = MultiControlNetModel(nets)
    return ControlInputs(
        controlnet=controlnet,
        images=images,
        conditioning_scale=[float(unit.weight) for _, unit in enabled],
        guidance_start=[float(unit.guidance_start) for _, unit in enabled],
        guidance_end=[float(unit.guidance_end) for _, unit in enabled],
        guess_mode=guess_mode,
        units=[unit for _, unit in enabled],
        models=models,
        detected_maps=detected_maps,
    )


def build_controlnet_pipeline(
    pipe: Any, controlnet: Any, *, mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
) -> Any:
    """The diffusers ControlNet pipeline sharing ``pipe``'s components (no copies, no loading)."""
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    is_sdxl = (
        getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None
    )
    classes = {
        (False, "txt2img"): StableDiffusionControlNetPipeline,
        (False, "img2img"): StableDiffusionControlNetImg2ImgPipeline,
        (False, "inpaint"): StableDiffusionControlNetInpaintPipeline,
        (True, "txt2img"): StableDiffusionXLControlNetPipeline,
        (True, "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
        (True, "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
    }
    cls = classes[(is_sdxl, mode)]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    components = {name: value for name, value in pipe.components.items() if name in accepted}
    components["controlnet"] = controlnet
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in accepted:
            components.setdefault(optional, None)
    if "requires_safety_checker" in accepted:
        components["requires_safety_checker"] = getattr(pipe, "safety_checker", None) is not None
    if "add_watermarker" in accepted:
        components["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    controlled = cls(**components)
    controlled.set_progress_bar_config(disable=True)
    return controlled
