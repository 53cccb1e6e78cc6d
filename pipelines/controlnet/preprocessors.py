"""The ControlNet preprocessor catalogue, the way the A1111 ``sd-webui-controlnet`` extension has it.

Preprocessors are keyed by the extension's module names. ``none``, ``invert``, ``canny`` and a few
other model-free ones run here; the annotator networks (depth, pose, HED...) run from the files the
extension downloads, found in ``models/ControlNet/annotators`` (see
:mod:`pipelines.controlnet.annotators`); asking for one whose file is missing names the file and
where to get it. Segmentation and DWPose are listed but not supported.

The detected map is then fitted to the generation size by the unit's resize mode
(:func:`resize_control_image`), and "Pixel Perfect" picks the preprocessor resolution from the
image and target sizes (:func:`pixel_perfect_resolution`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from contract.controlnet import resolve_preprocessor_name
from pipelines.controlnet import annotators as annotators_module
from pipelines.controlnet.image_prep import hwc3, image_to_array, resize_with_pad64
from pipelines.controlnet.model_files import ANNOTATOR_FOLDER
from pipelines.errors import AnnotatorLoadError, AnnotatorMissingError, ControlNetError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from pipelines.controlnet.annotators import AnnotatorCache, AnnotatorFunction


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


def _run_none(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    return hwc3(image)


def _run_invert(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    return 255 - hwc3(image)


def _run_canny(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    import cv2

    padded, remove_pad = resize_with_pad64(image, resolution)
    edges = cv2.Canny(padded, int(threshold_a), int(threshold_b))
    return hwc3(remove_pad(edges))


def _run_threshold(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float) -> np.ndarray:
    import numpy as np

    padded, remove_pad = resize_with_pad64(image, resolution)
    result = np.zeros(padded.shape[:2], dtype=np.uint8)
    result[np.min(padded, axis=2) > threshold_a] = 255
    return hwc3(remove_pad(result))


def _run_scribble_xdog(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2
    import numpy as np

    padded, remove_pad = resize_with_pad64(image, resolution)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    difference = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros(padded.shape[:2], dtype=np.uint8)
    result[2 * (255 - difference.astype(np.int32)) > threshold_a] = 255
    return hwc3(remove_pad(result))


def _run_tile_resample(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2

    image = hwc3(image)
    if threshold_a < 1.1:
        return image
    height, width = image.shape[:2]
    size = (max(1, int(width / threshold_a)), max(1, int(height / threshold_a)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _run_blur_gaussian(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2

    padded, remove_pad = resize_with_pad64(image, resolution)
    return cv2.GaussianBlur(remove_pad(padded), (0, 0), float(threshold_a))


def _run_lineart_standard(
    image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float
) -> np.ndarray:
    import cv2
    import numpy as np

    padded, remove_pad = resize_with_pad64(image, resolution)
    pixels = padded.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), 6.0)
    intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    intensity *= 127
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


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
    return detect_control_map(preprocessor, image, res, threshold_a, threshold_b, annotator_dir, annotators)


def detect_control_map(
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
    pixels = image_to_array(image)
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
    return PILImage.fromarray(hwc3(np.asarray(result)), mode="RGB")


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

    image = hwc3(image)
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
