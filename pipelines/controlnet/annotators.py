"""The ControlNet annotator networks (depth, pose, soft edges, line art...) run from the user's files.

The network classes and their pre/post-processing come from ``controlnet_aux`` (Apache-2.0). Its
``from_pretrained`` loaders are never used: they download from the Hugging Face hub and unpickle
with plain ``torch.load``, which can run code hidden in a file. Instead each network is built here
from its controlnet_aux class (without random init or any pretrained download), its weights are
read with :func:`read_annotator_weights` (safetensors, or ``torch.load(weights_only=True)``) and
loaded with ``strict=True``, and the network is handed to controlnet_aux's detector class, or run
with its post-processing.

Inputs and sliders follow the ``sd-webui-controlnet`` extension: the image is scaled so its short
side is the preprocessor resolution, edge-padded to multiples of 64, detected, and the padding cut
off again (the detectors are called at exactly the padded size, so their own resizing is a no-op).

Loaded networks live in an :class:`AnnotatorCache` owned by the engine (no module globals). They
stay on the CPU between jobs and visit the GPU, when there is one, only while they run, so the
VRAM stays with the Stable Diffusion model.

``controlnet_aux`` imports every detector when any is imported (~6 s), so it is only imported
inside the functions here, on first use.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipelines.controlnet.image_prep import hwc3, resize_with_pad64
from pipelines.errors import AnnotatorLoadError, CheckpointLoadError, ControlNetError
from pipelines.models.weight_files import read_state_dict

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 4
"""Networks kept loaded (openpose_full counts three). The largest, ZoeDepth, is ~1.4 GB in fp32."""

AnnotatorFunction = Callable[
    ["np.ndarray", int, float, float, Sequence[Path], "AnnotatorCache"], "np.ndarray"
]
"""``(image, resolution, threshold_a, threshold_b, files, cache) -> uint8 H x W x 3``; ``files`` are
the preprocessor's annotator files in the order of its table entry."""


# ============================================================================================
# Cache
# ============================================================================================


class AnnotatorCache:
    """Loaded annotator networks, least recently used dropped first. One per engine; thread-safe.

    Networks are keyed by kind and file (path, size, modification time), so a replaced file is
    reloaded, and shared between preprocessors that use the same file (``depth_midas`` and
    ``normal_midas``, the HED family...). They are kept on the CPU; :meth:`on_device` moves them to
    the GPU (CUDA when available) for one run and back afterwards.
    """

    def __init__(self, *, capacity: int = DEFAULT_CAPACITY, device: str | None = None) -> None:
        if capacity < 1:
            raise ValueError("AnnotatorCache capacity must be at least 1.")
        self.capacity = capacity
        self._device = device
        self._networks: OrderedDict[tuple[str, str, int, int], Any] = OrderedDict()
        self._lock = threading.Lock()  # the table, and loading (one file read at a time)
        self._run_lock = threading.Lock()  # one preprocessor on the device at a time

    def __len__(self) -> int:
        with self._lock:
            return len(self._networks)

    @property
    def device(self) -> torch.device:
        """Where networks run: the configured device, else CUDA when available, else the CPU."""
        import torch

        if self._device:
            return torch.device(self._device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def network(self, kind: str, path: Path, build: Callable[[Path], Any]) -> Any:
        """The network ``build(path)`` makes, loaded on first use (on the CPU, fp32, eval mode)."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise AnnotatorLoadError(path.name, f"{path.name}: cannot be read ({exc}).") from exc
        key = (kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._networks.get(key)
            if cached is not None:
                self._networks.move_to_end(key)
                return cached
            network = build(path)
            log.info("loaded annotator %s from %s", kind, path)
            self._networks[key] = network
            while len(self._networks) > self.capacity:
                self._networks.popitem(last=False)
            return network

    @contextlib.contextmanager
    def on_device(self, *networks: Any) -> Iterator[torch.device]:
        """Run ``networks`` on :attr:`device` (no gradients); they go back to the CPU afterwards."""
        import torch

        device = self.device
        with self._run_lock:
            try:
                for network in networks:
                    network.to(device)
                with torch.no_grad():
                    yield device
            finally:
                if device.type != "cpu":
                    for network in networks:
                        network.to("cpu")

    def clear(self) -> None:
        """Drop every loaded network (e.g. to free memory)."""
        with self._lock:
            self._networks.clear()


# ============================================================================================
# Reading and loading weights
# ============================================================================================


def read_annotator_weights(path: Path) -> Any:
    """What an annotator file holds, read without running pickled code: ``.safetensors`` with
    safetensors, anything else only through ``torch.load(weights_only=True)`` (a pickle holding
    objects other than tensors, numbers, strings and containers is refused)."""
    import pickle

    import torch

    if path.suffix.lower() == ".safetensors":
        try:
            return read_state_dict(path)
        except CheckpointLoadError as exc:
            raise AnnotatorLoadError(path.name, str(exc)) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        text = str(exc)
        if "global" in text:  # "Unsupported global" / "not an allowed global": a class or function
            raise AnnotatorLoadError(
                path.name,
                f"{path.name}: refused to load: the file holds Python objects other than weights, and "
                "loading it could run code.",
            ) from exc
        raise AnnotatorLoadError(
            path.name, f"{path.name}: not a readable weights file (corrupt or truncated: {text[:200]})."
        ) from exc


def _state_dict(data: Any, path: Path, wrappers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``data``: inside the first of ``wrappers`` present (training scripts save
    ``{"model": ...}``, ``{"state_dict": ...}``...), without the ``module.`` prefix DataParallel
    puts on every key."""
    import torch

    if isinstance(data, Mapping):
        for wrapper in wrappers:
            if isinstance(data.get(wrapper), Mapping):
                data = data[wrapper]
                break
    tensors = (
        {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if isinstance(data, Mapping)
        else {}
    )
    if not tensors:
        raise AnnotatorLoadError(path.name, f"{path.name}: holds no network weights.")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


def _load_strict(
    build: Callable[[], Any],
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    what: str,
    *,
    init: Literal["meta", "empty"] = "meta",
    rename: Callable[[Any, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None,
) -> Any:
    """Build a network and load ``state_dict`` into it with ``strict=True``; it is returned on the
    CPU, in fp32, in eval mode.

    The network is built without memory or random init and the file's tensors are assigned to
    it (ZoeDepth loads in about a second instead of spending ten on an init the file overwrites):
    ``init="meta"`` builds it on PyTorch's meta device (thread-local), for networks whose whole
    state is in their state dict; ``init="empty"`` only leaves the parameters empty (accelerate's
    ``init_empty_weights``, as diffusers loads models), for networks with buffers they compute
    themselves and do not save (ZoeDepth's BEiT).

    Keys of non-persistent buffers (which newer timm versions recompute, e.g. BEiT's
    ``relative_position_index``) are dropped first, and BatchNorm counters that files from old
    PyTorch versions lack are not required. ``nn.Module.load_state_dict`` is called directly
    because some classes (ZoeDepth) override it with a silent ``strict=False``. ``rename(network,
    state_dict)`` maps file keys to the network's where the file uses other names.
    """
    import torch
    from accelerate import init_empty_weights

    empty: Any = init_empty_weights(include_buffers=False) if init == "empty" else torch.device("meta")
    with warnings.catch_warnings(), empty:
        warnings.simplefilter("ignore")  # timm's notes on renamed model names, deprecated imports
        network = build()
    if rename is not None:
        state_dict = rename(network, state_dict)
    expected = network.state_dict()
    recomputed = {name for name, _ in network.named_buffers()} - set(expected)
    state = {key: value for key, value in state_dict.items() if key not in recomputed}
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            part
            for part in (
                missing and f"missing {', '.join(missing[:3])}",
                unexpected and f"unexpected {', '.join(unexpected[:3])}",
                wrong and f"wrong shape {', '.join(wrong[:3])}",
            )
            if part
        )
        raise AnnotatorLoadError(
            path.name,
            f"{path.name}: does not hold the weights of the {what} ({detail}). It may be damaged, or "
            "another file with the same name.",
        )
    for key in set(expected) - set(state):  # only BatchNorm counters (unused in eval) are left
        state[key] = torch.zeros((), dtype=torch.long)
    torch.nn.Module.load_state_dict(network, state, strict=True, assign=True)
    unset = [
        name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta
    ]
    if unset:  # a buffer the network computes itself: it must be built with init="empty"
        raise AssertionError(f"{what}: {unset[:3]} are not in the state dict; build it with init='empty'")
    return network.float().eval()


def _import_controlnet_aux() -> None:
    """Import controlnet_aux quietly: its package imports every detector, which warn about optional
    packages (mediapipe, mmpose) and timm names that SD Studio does not use."""
    import sys

    if "controlnet_aux" in sys.modules:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import controlnet_aux  # noqa: F401
    except ImportError as exc:
        raise ControlNetError(
            f"The annotator preprocessors need the controlnet_aux package ({exc}). Install SD Studio's "
            "requirements again (pip install -r requirements.txt)."
        ) from exc


# --- network builders: each takes the file and returns the loaded network --------------------


def load_hed(path: Path) -> Any:
    """HED soft-edge network (``ControlNetHED.pth``: a plain state dict)."""
    _import_controlnet_aux()
    from controlnet_aux.hed import ControlNetHED_Apache2

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(ControlNetHED_Apache2, state, path, "HED network")


def load_pidinet(path: Path) -> Any:
    """PiDiNet soft-edge network (``table5_pidinet.pth``: ``{"state_dict": {"module.*": ...}}``)."""
    _import_controlnet_aux()
    from controlnet_aux.pidi.model import pidinet

    state = _state_dict(read_annotator_weights(path), path, ("state_dict",))
    return _load_strict(pidinet, state, path, "PiDiNet network")


def load_lineart(path: Path) -> Any:
    """Line-art generator (``sk_model.pth`` realistic, ``sk_model2.pth`` coarse: plain state dicts)."""
    _import_controlnet_aux()
    from controlnet_aux.lineart import Generator

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(lambda: Generator(3, 1, 3), state, path, "line-art network")


def load_lineart_anime(path: Path) -> Any:
    """Anime line-art U-Net (``netG.pth``: keys with DataParallel's ``module.`` prefix)."""
    import functools

    _import_controlnet_aux()
    from controlnet_aux.lineart_anime import UnetGenerator
    from torch import nn

    norm_layer = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(
        lambda: UnetGenerator(3, 1, 8, 64, norm_layer=norm_layer, use_dropout=False),
        state,
        path,
        "anime line-art network",
    )


def load_mlsd(path: Path) -> Any:
    """M-LSD straight-line network (``mlsd_large_512_fp32.pth``: a plain state dict)."""
    _import_controlnet_aux()
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(MobileV2_MLSD_Large, state, path, "M-LSD line network")


def _openpose_caffe_names(network: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenPose body/hand files keep the Caffe layer names (``conv1_1.weight``); the network
    nests them in stages (``model0.conv1_1.weight``). Map each network key to its file key."""
    renamed = {}
    for key in network.state_dict():
        layer = key.partition(".")[2]
        if layer in state:
            renamed[key] = state[layer]
    leftover = set(state) - {key.partition(".")[2] for key in renamed}
    renamed.update({f"unmatched.{key}": state[key] for key in leftover})  # reported as unexpected
    return renamed


def load_openpose_body(path: Path) -> Any:
    """OpenPose body network (``body_pose_model.pth``: Caffe layer names)."""
    _import_controlnet_aux()
    from controlnet_aux.open_pose.model import bodypose_model

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(bodypose_model, state, path, "OpenPose body network", rename=_openpose_caffe_names)


def load_openpose_hand(path: Path) -> Any:
    """OpenPose hand network (``hand_pose_model.pth``: Caffe layer names)."""
    _import_controlnet_aux()
    from controlnet_aux.open_pose.model import handpose_model

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(handpose_model, state, path, "OpenPose hand network", rename=_openpose_caffe_names)


def load_openpose_face(path: Path) -> Any:
    """OpenPose face network (``facenet.pth``: a plain state dict)."""
    _import_controlnet_aux()
    from controlnet_aux.open_pose.face import FaceNet

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(FaceNet, state, path, "OpenPose face network")


def load_midas(path: Path) -> Any:
    """MiDaS DPT-Hybrid depth network (``dpt_hybrid-midas-501f0c75.pt``: a plain state dict, or
    ``{"model": ..., "optimizer": ...}`` as MiDaS training saves it)."""
    _import_controlnet_aux()
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    state = _state_dict(read_annotator_weights(path), path, ("model",))
    return _load_strict(
        lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True),
        state,
        path,
        "MiDaS DPT-Hybrid depth network",
    )


def load_normal_bae(path: Path) -> Any:
    """BAE surface-normal network (``scannet.pt``: ``{"model": {"module.*": ...}}``)."""
    import types

    _import_controlnet_aux()
    from controlnet_aux.normalbae.nets.NNET import NNET

    # the options NormalBaeDetector.from_pretrained uses; the EfficientNet-B5 encoder is built from
    # controlnet_aux's bundled copy (torch.hub source="local", pretrained=False: nothing downloaded)
    options = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )
    state = _state_dict(read_annotator_weights(path), path, ("model",))
    return _load_strict(lambda: NNET(options), state, path, "BAE normal network")


def load_leres(path: Path) -> Any:
    """LeReS ResNeXt-101 depth network (``res101.pth``: ``{"depth_model": {"module.*": ...}}``)."""
    _import_controlnet_aux()
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

    state = _state_dict(read_annotator_weights(path), path, ("depth_model",))
    return _load_strict(lambda: RelDepthModel(backbone="resnext101"), state, path, "LeReS depth network")


def load_leres_merge(path: Path) -> Any:
    """The pix2pix merge network of LeReS++ boosting (``latest_net_G.pth``: a plain state dict)."""
    _import_controlnet_aux()
    from controlnet_aux.leres.pix2pix.models.networks import define_G

    state = _state_dict(read_annotator_weights(path), path)
    return _load_strict(
        # the generator Pix2Pix4DepthModel defines (2 inputs, 1 output, U-Net 1024, no norm), CPU only
        lambda: define_G(2, 1, 64, "unet_1024", "none", False, "normal", 0.02, []),
        state,
        path,
        "LeReS++ merge network",
    )


def load_zoedepth(path: Path) -> Any:
    """ZoeDepth (``ZoeD_M12_N.pt``: ``{"model": ...}``), built from controlnet_aux's ``zoedepth``
    inference config with no pretrained MiDaS download."""
    _import_controlnet_aux()
    from controlnet_aux.zoe.zoedepth.models.zoedepth.zoedepth_v1 import ZoeDepth
    from controlnet_aux.zoe.zoedepth.utils.config import get_config

    state = _state_dict(read_annotator_weights(path), path, ("model",))
    config = get_config("zoedepth", "infer")
    return _load_strict(
        lambda: ZoeDepth.build_from_config(config),
        state,
        path,
        "ZoeDepth network",
        init="empty",  # BEiT's relative_position_index and k_bias are computed, not saved
    )


# ============================================================================================
# Running
# ============================================================================================


def _file(files: Sequence[Path], name: str) -> Path:
    """The found file called ``name`` (the table lists several per preprocessor)."""
    for path in files:
        if path.name == name:
            return path
    raise AssertionError(f"{name} is not among the preprocessor's files {[p.name for p in files]}")


def _padded(image: np.ndarray, resolution: int, detect: Callable[[np.ndarray, int], Any]) -> np.ndarray:
    """Run ``detect(padded, size)`` the extension's way: short side ``resolution``, edge-padded to
    multiples of 64 (``size`` is the padded short side, which makes controlnet_aux's own resizing
    a no-op), padding removed from the result."""
    import numpy as np

    padded, remove_pad = resize_with_pad64(image, resolution)
    result = hwc3(np.asarray(detect(padded, min(padded.shape[:2]))))
    return hwc3(remove_pad(result))


def _sizes(size: int) -> dict[str, Any]:
    return {"detect_resolution": size, "image_resolution": size, "output_type": "np"}


def _scribble(edges: np.ndarray) -> np.ndarray:
    """Soft edges to a scribble: thin with non-maximum suppression, blur, binarise (the extension's
    ``scribble_hed``/``scribble_pidinet``, applied after the padding is removed, as it does)."""
    import cv2
    from controlnet_aux.util import nms

    result = nms(edges[:, :, 0], 127, 3.0)
    result = cv2.GaussianBlur(result, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return hwc3(result)


def _soft_edges(kind: Literal["hed", "pidinet"], *, safe: bool, scribble: bool) -> AnnotatorFunction:
    """HED (``ControlNetHED.pth``) or PiDiNet (``table5_pidinet.pth``) soft edges; ``safe`` is the
    extension's quantised "safe" variant, ``scribble`` turns the edges into a scribble."""

    def run(
        image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
    ) -> np.ndarray:
        detector: Any
        if kind == "hed":
            from controlnet_aux.hed import HEDdetector

            network = cache.network("hed", _file(files, "ControlNetHED.pth"), load_hed)
            detector = HEDdetector(network)
        else:
            from controlnet_aux.pidi import PidiNetDetector

            network = cache.network("pidinet", _file(files, "table5_pidinet.pth"), load_pidinet)
            detector = PidiNetDetector(network)
        with cache.on_device(network):
            edges = _padded(image, resolution, lambda img, size: detector(img, safe=safe, **_sizes(size)))
        return _scribble(edges) if scribble else edges

    return run


run_hed = _soft_edges("hed", safe=False, scribble=False)
run_hed_safe = _soft_edges("hed", safe=True, scribble=False)
run_scribble_hed = _soft_edges("hed", safe=False, scribble=True)
run_pidinet = _soft_edges("pidinet", safe=False, scribble=False)
run_pidinet_safe = _soft_edges("pidinet", safe=True, scribble=False)
run_scribble_pidinet = _soft_edges("pidinet", safe=False, scribble=True)


def run_lineart(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    """``lineart_realistic`` (``sk_model.pth``) and ``lineart_coarse`` (``sk_model2.pth``): the same
    network with other weights; white lines on black, as the extension inverts them."""
    network = cache.network("lineart", files[0], load_lineart)
    from controlnet_aux.lineart import LineartDetector

    with cache.on_device(network):
        detector = LineartDetector(network, network)
        return _padded(image, resolution, lambda img, size: detector(img, coarse=False, **_sizes(size)))


def run_lineart_anime(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    network = cache.network("lineart_anime", _file(files, "netG.pth"), load_lineart_anime)
    from controlnet_aux.lineart_anime import LineartAnimeDetector

    with cache.on_device(network):
        detector = LineartAnimeDetector(network)
        return _padded(image, resolution, lambda img, size: detector(img, **_sizes(size)))


def run_mlsd(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    """Straight lines; ``a`` is the value (score) threshold, ``b`` the distance threshold.

    Calls controlnet_aux's ``pred_lines`` directly rather than ``MLSDdetector``, which hides every
    exception; ``pred_lines`` fails with an IndexError only when no line passes the thresholds."""
    import cv2
    import numpy as np

    network = cache.network("mlsd", _file(files, "mlsd_large_512_fp32.pth"), load_mlsd)
    from controlnet_aux.mlsd.utils import pred_lines

    def detect(padded: np.ndarray, size: int) -> np.ndarray:
        lines_map = np.zeros(padded.shape[:2], dtype=np.uint8)
        try:
            lines = pred_lines(padded, network, [padded.shape[0], padded.shape[1]], a, b)
        except IndexError:  # no segment found: an empty map, as the extension returns
            return lines_map
        for x_start, y_start, x_end, y_end in np.asarray(lines).astype(int).tolist():
            cv2.line(lines_map, (x_start, y_start), (x_end, y_end), 255, 1)
        return lines_map

    with cache.on_device(network):
        return _padded(image, resolution, detect)


def _run_openpose(
    image: np.ndarray,
    resolution: int,
    files: Sequence[Path],
    cache: AnnotatorCache,
    *,
    hand: bool,
    face: bool,
) -> np.ndarray:
    body_net = cache.network("openpose_body", _file(files, "body_pose_model.pth"), load_openpose_body)
    hand_net = (
        cache.network("openpose_hand", _file(files, "hand_pose_model.pth"), load_openpose_hand)
        if hand
        else None
    )
    face_net = (
        cache.network("openpose_face", _file(files, "facenet.pth"), load_openpose_face) if face else None
    )
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, params
    from controlnet_aux.open_pose.hand import Hand

    # controlnet_aux's estimators take a file path and torch.load it in __init__; these take the
    # network already loaded here
    class LoadedBody(Body):
        def __init__(self, model: Any) -> None:
            self.model = model

    class LoadedHand(Hand):
        def __init__(self, model: Any) -> None:
            self.model = model

    class LoadedFace(Face):
        def __init__(self, model: Any) -> None:
            self.inference_size = params["inference_img_size"]
            self.sigma = params["gaussian_sigma"]
            self.threshold = params["heatmap_peak_thresh"]
            self.model = model

    networks = [net for net in (body_net, hand_net, face_net) if net is not None]
    with cache.on_device(*networks):
        detector = OpenposeDetector(
            LoadedBody(body_net),
            LoadedHand(hand_net) if hand_net is not None else None,
            LoadedFace(face_net) if face_net is not None else None,
        )
        return _padded(
            image,
            resolution,
            lambda img, size: detector(
                img, include_body=True, include_hand=hand, include_face=face, **_sizes(size)
            ),
        )


def _openpose(*, hand: bool, face: bool) -> AnnotatorFunction:
    """OpenPose body, plus hands and/or face."""

    def run(
        image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
    ) -> np.ndarray:
        return _run_openpose(image, resolution, files, cache, hand=hand, face=face)

    return run


run_openpose = _openpose(hand=False, face=False)
run_openpose_face = _openpose(hand=False, face=True)
run_openpose_hand = _openpose(hand=True, face=False)
run_openpose_full = _openpose(hand=True, face=True)


def _run_midas(
    image: np.ndarray,
    resolution: int,
    files: Sequence[Path],
    cache: AnnotatorCache,
    *,
    normal_bg: float | None,
) -> np.ndarray:
    import numpy as np

    network = cache.network("midas", _file(files, "dpt_hybrid-midas-501f0c75.pt"), load_midas)
    from controlnet_aux.midas import MidasDetector

    def detect(img: np.ndarray, size: int) -> np.ndarray:
        detector = MidasDetector(network)
        if normal_bg is None:
            return detector(img, a=np.pi * 2.0, **_sizes(size))
        _, normal = detector(img, a=np.pi * 2.0, bg_th=normal_bg, depth_and_normal=True, **_sizes(size))
        return normal

    with cache.on_device(network):
        return _padded(image, resolution, detect)


def run_depth_midas(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    return _run_midas(image, resolution, files, cache, normal_bg=None)


def run_normal_midas(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    """Normals from MiDaS depth; ``a`` is the background threshold (relative depth below it: flat)."""
    return _run_midas(image, resolution, files, cache, normal_bg=a)


def run_normal_bae(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    network = cache.network("normal_bae", _file(files, "scannet.pt"), load_normal_bae)
    from controlnet_aux.normalbae import NormalBaeDetector

    with cache.on_device(network):
        detector = NormalBaeDetector(network)
        return _padded(image, resolution, lambda img, size: detector(img, **_sizes(size)))


_LERES_BOOST_MIN_RANGE = 480
"""LeReS++ boosting needs ``3 * long side`` to reach this (448 px receptive field + one 16 px step)."""


def _run_leres(
    image: np.ndarray,
    resolution: int,
    a: float,
    b: float,
    files: Sequence[Path],
    cache: AnnotatorCache,
    *,
    boost: bool,
) -> np.ndarray:
    depth_net = cache.network("leres", _file(files, "res101.pth"), load_leres)
    merge_net = (
        cache.network("leres_merge", _file(files, "latest_net_G.pth"), load_leres_merge) if boost else None
    )
    from controlnet_aux.leres import LeresDetector
    from controlnet_aux.leres.pix2pix.models.pix2pix4depth_model import Pix2Pix4DepthModel

    class LoadedMergeModel(Pix2Pix4DepthModel):
        """The boosting merge step around an already loaded generator (the original class parses
        the command line and loads ``latest_net_G.pth`` itself)."""

        def __init__(self, generator: Any, device: torch.device) -> None:
            self.netG = generator
            self.device = device
            self.isTrain = False
            self.model_names = ["G"]
            self.visual_names = ["fake_B"]

    def detect(img: np.ndarray, size: int) -> np.ndarray:
        # boosting searches resolutions from 448 px up to 3x the image's long side and fails
        # (UnboundLocalError inside controlnet_aux) when that range is empty: plain LeReS then
        boosted = boost and 3 * max(img.shape[:2]) >= _LERES_BOOST_MIN_RANGE
        return detector(img, thr_a=a, thr_b=b, boost=boosted, **_sizes(size))

    networks = [net for net in (depth_net, merge_net) if net is not None]
    with cache.on_device(*networks) as device:
        merge = LoadedMergeModel(merge_net, device) if merge_net is not None else None
        detector = LeresDetector(depth_net, merge)
        return _padded(image, resolution, detect)


def run_depth_leres(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    """``a``: remove near %, ``b``: remove background % (the extension's sliders)."""
    return _run_leres(image, resolution, a, b, files, cache, boost=False)


def run_depth_leres_boost(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    """``depth_leres++``: LeReS with the pix2pix merge network's boosting."""
    return _run_leres(image, resolution, a, b, files, cache, boost=True)


def run_depth_zoe(
    image: np.ndarray, resolution: int, a: float, b: float, files: Sequence[Path], cache: AnnotatorCache
) -> np.ndarray:
    network = cache.network("zoedepth", _file(files, "ZoeD_M12_N.pt"), load_zoedepth)
    from controlnet_aux.zoe import ZoeDetector

    with cache.on_device(network):
        detector = ZoeDetector(network)
        return _padded(image, resolution, lambda img, size: detector(img, **_sizes(size)))
