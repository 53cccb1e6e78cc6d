"""RetinaFace (ResNet-50) face detection, loading facexlib's ``detection_Resnet50_Final.pth`` strictly.

SadTalker's reference finds the face with facexlib's RetinaFace before placing landmarks (facts from
OpenTalker/SadTalker ``src/face3d/extract_kp_videos_safe.py`` / ``src/utils/croper.py`` and facexlib
``detection/retinaface*.py``). This is our own implementation of that network and its decoding:

* Backbone: a torchvision-layout ResNet-50 under ``body.`` (``conv1``, ``bn1``, ``layer1``-``layer4``;
  no classifier), whose ``layer2``/``layer3``/``layer4`` outputs (512/1024/2048 channels, strides
  8/16/32) feed the rest.
* ``fpn``: 1x1 conv + BN + ReLU laterals ``output1``-``output3`` to 256 channels, top-down nearest
  upsampling with 3x3 ``merge2`` then ``merge1``.
* ``ssh1``-``ssh3``: single-stage context modules (3x3 branch of 128 channels, two stacked 3x3 branches
  of 64), concatenated and ReLU'd.
* Heads per level, two anchors per position: ``ClassHead`` (2 logits each), ``BboxHead`` (4 offsets),
  ``LandmarkHead`` (5 points), all 1x1 convs.

Inference as the reference: BGR float pixels minus the mean (104, 117, 123), no scaling; anchors of
16/32, 64/128 and 256/512 pixels on the 8/16/32 strides; SSD decoding with variances (0.1, 0.2); faces
with a softmax score above 0.97 (SadTalker's threshold); NMS at IoU 0.4.

Deviations: the reference detects on the photo at its own size; photos whose long side exceeds
facexlib's own limit of 2150 pixels are detected on a copy downscaled to that size (boxes mapped back),
which bounds time and memory on big photos. Of several faces the largest wins (the reference took the
most confident one). Boxes are clipped to the photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.errors import SadTalkerCheckpointError
from sadtalker.networks.face_recon import ResNet50Trunk

DETECTOR_FILE = "detection_Resnet50_Final.pth"
FACEXLIB_RELEASE = "https://github.com/xinntao/facexlib/releases/tag/v0.1.0"
# Mean of the BGR training images, subtracted from the raw 0-255 pixels.
BGR_MEAN = (104.0, 117.0, 123.0)
# Anchor sizes (pixels) and strides of the three detection levels, and the box-coding variances.
ANCHOR_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))
ANCHOR_STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES = (0.1, 0.2)
# SadTalker calls ``detect_faces(image, 0.97)``; facexlib's NMS threshold is 0.4.
CONFIDENCE_THRESHOLD = 0.97
NMS_IOU_THRESHOLD = 0.4
# facexlib's ``max_size``: the longest side it ever resizes a photo to.
DETECTION_MAX_SIDE = 2150
FPN_CHANNELS = 256
BATCH_COUNTER_SUFFIX = "num_batches_tracked"
_KEYS_SHOWN = 5

Network = TypeVar("Network", bound=nn.Module)


# --- the network ----------------------------------------------------------------------------------


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> nn.Sequential:
    """``conv (no bias) -> BN [-> ReLU]``; the conv is entry ``0`` and the BN entry ``1`` of the file."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        # The reference uses LeakyReLU with slope 0 for 256-channel layers, i.e. a ReLU.
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResNet50Stages(ResNet50Trunk):
    """The ResNet-50 trunk returning its stride-8/16/32 stage outputs (``layer2``-``layer4``)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        out = self.layer1(out)
        stride8 = self.layer2(out)
        stride16 = self.layer3(stride8)
        return [stride8, stride16, self.layer4(stride16)]


class FeaturePyramid(nn.Module):
    """Top-down feature pyramid over the three backbone stages (all to ``channels``)."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int) -> None:
        super().__init__()
        self.output1 = conv_bn(in_channels[0], channels, 1, relu=True)
        self.output2 = conv_bn(in_channels[1], channels, 1, relu=True)
        self.output3 = conv_bn(in_channels[2], channels, 1, relu=True)
        self.merge1 = conv_bn(channels, channels, 3, relu=True)
        self.merge2 = conv_bn(channels, channels, 3, relu=True)

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        fine, middle, coarse = self.output1(stages[0]), self.output2(stages[1]), self.output3(stages[2])
        middle = self.merge2(middle + F.interpolate(coarse, size=middle.shape[-2:], mode="nearest"))
        fine = self.merge1(fine + F.interpolate(middle, size=fine.shape[-2:], mode="nearest"))
        return [fine, middle, coarse]


class ContextModule(nn.Module):
    """SSH context module: a 3x3 branch (half the channels) and 5x5/7x7-like stacked 3x3 branches.

    Attribute names (including the lower-case ``x`` of ``conv7x7_3``) are those of the weight file.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = conv_bn(channels, half, 3, relu=False)
        self.conv5X5_1 = conv_bn(channels, quarter, 3, relu=True)
        self.conv5X5_2 = conv_bn(quarter, quarter, 3, relu=False)
        self.conv7X7_2 = conv_bn(quarter, quarter, 3, relu=True)
        self.conv7x7_3 = conv_bn(quarter, quarter, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(shared)
        branch7 = self.conv7x7_3(self.conv7X7_2(shared))
        return F.relu(torch.cat([self.conv3X3(x), branch5, branch7], dim=1))


class AnchorHead(nn.Module):
    """A 1x1 conv predicting ``values`` numbers per anchor; output ``(bs, positions * anchors, values)``."""

    def __init__(self, channels: int, anchors: int, values: int) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFaceNet(nn.Module):
    """Normalised BGR image ``(bs, 3, h, w)`` -> box offsets, class logits and five-point offsets.

    Outputs are per anchor in :func:`prior_boxes` order: ``(bs, n, 4)``, ``(bs, n, 2)``, ``(bs, n, 10)``.
    """

    def __init__(self) -> None:
        super().__init__()
        anchors = len(ANCHOR_SIZES[0])
        self.body = ResNet50Stages()
        self.fpn = FeaturePyramid((512, 1024, 2048), FPN_CHANNELS)
        self.ssh1 = ContextModule(FPN_CHANNELS)
        self.ssh2 = ContextModule(FPN_CHANNELS)
        self.ssh3 = ContextModule(FPN_CHANNELS)
        levels = range(len(ANCHOR_STEPS))
        self.ClassHead = nn.ModuleList(AnchorHead(FPN_CHANNELS, anchors, 2) for _ in levels)
        self.BboxHead = nn.ModuleList(AnchorHead(FPN_CHANNELS, anchors, 4) for _ in levels)
        self.LandmarkHead = nn.ModuleList(AnchorHead(FPN_CHANNELS, anchors, 10) for _ in levels)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pyramid = self.fpn(self.body(image))
        features = [self.ssh1(pyramid[0]), self.ssh2(pyramid[1]), self.ssh3(pyramid[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1)
        points = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1)
        return boxes, logits, points


# --- anchors and decoding -------------------------------------------------------------------------


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """Anchors ``(n, 4)`` as ``(cx, cy, w, h)`` fractions of the image, in the heads' output order.

    Level by level (strides 8, 16, 32 over ``ceil(size / stride)`` cells), row by row, column by
    column, then the level's two anchor sizes; centres sit in the middle of their cell.
    """
    levels = []
    for step, sizes in zip(ANCHOR_STEPS, ANCHOR_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        count = len(sizes)
        anchor_w = torch.tensor([size / width for size in sizes], dtype=torch.float32)
        anchor_h = torch.tensor([size / height for size in sizes], dtype=torch.float32)
        level = torch.stack(
            [
                grid_x[..., None].expand(rows, cols, count),
                grid_y[..., None].expand(rows, cols, count),
                anchor_w.expand(rows, cols, count),
                anchor_h.expand(rows, cols, count),
            ],
            dim=-1,
        )
        levels.append(level.reshape(-1, 4))
    return torch.cat(levels)


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD box decoding: ``(n, 4)`` offsets + ``(cx, cy, w, h)`` priors -> ``(x1, y1, x2, y2)`` fractions."""
    centre = priors[:, :2] + offsets[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[:, 2:] * VARIANCES[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_points(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Five-point decoding: ``(n, 10)`` offsets -> ``(n, 5, 2)`` image fractions (x, y)."""
    points = offsets.reshape(-1, 5, 2)
    return priors[:, None, :2] + points * VARIANCES[0] * priors[:, None, 2:]


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices of the boxes kept, best score first (a box overlapping a better one by > ``iou`` goes)."""
    from torchvision.ops import nms

    return nms(boxes.float(), scores.float(), iou)


@dataclass(frozen=True)
class FaceDetection:
    """One face: ``box`` ``(x1, y1, x2, y2)`` in photo pixels, its score and five points ``(5, 2)``
    (image-left eye, image-right eye, nose tip, left and right mouth corners)."""

    box: tuple[float, float, float, float]
    score: float
    five_points: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


class RetinaFaceDetector:
    """Runs :class:`RetinaFaceNet` on RGB photos and returns the faces it is confident about."""

    name = "retinaface"

    def __init__(
        self,
        network: RetinaFaceNet,
        device: torch.device | str = "cpu",
        confidence_threshold: float = CONFIDENCE_THRESHOLD,
        nms_threshold: float = NMS_IOU_THRESHOLD,
        max_side: int = DETECTION_MAX_SIDE,
    ) -> None:
        self.network = network
        self.device = torch.device(device)
        self.confidence_threshold = confidence_threshold
        self.nms_threshold = nms_threshold
        self.max_side = max_side

    def detect(self, image: np.ndarray) -> list[FaceDetection]:
        """Faces in an RGB uint8 photo ``(h, w, 3)``, most confident first."""
        import cv2

        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(image[..., ::-1], dtype=np.float32)
        tensor = torch.from_numpy(bgr).permute(2, 0, 1)[None].to(self.device)
        tensor = tensor - torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        in_height, in_width = tensor.shape[-2:]
        with torch.no_grad():
            offsets, logits, point_offsets = self.network(tensor)
        priors = prior_boxes(in_height, in_width)
        offsets, logits, point_offsets = (t[0].float().cpu() for t in (offsets, logits, point_offsets))
        if offsets.shape[0] != priors.shape[0]:
            raise RuntimeError(f"RetinaFace produced {offsets.shape[0]} anchors, expected {priors.shape[0]}")
        scores = torch.softmax(logits, dim=-1)[:, 1]
        # Pixel scale of the original photo (fractions of the detection input map to the photo).
        to_pixels = torch.tensor([width, height], dtype=torch.float32)
        boxes = decode_boxes(offsets, priors) * to_pixels.repeat(2)
        points = decode_points(point_offsets, priors) * to_pixels
        keep = (scores > self.confidence_threshold) & torch.isfinite(boxes).all(dim=1)
        boxes, points, scores = boxes[keep], points[keep], scores[keep]
        if boxes.shape[0] == 0:
            return []
        kept = non_maximum_suppression(boxes, scores, self.nms_threshold)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return [
            FaceDetection(
                box=tuple(float(v) for v in boxes[index]),  # type: ignore[arg-type]
                score=float(scores[index]),
                five_points=points[index].numpy().astype(np.float32),
            )
            for index in kept.tolist()
        ]

    def largest_face(self, image: np.ndarray) -> FaceDetection | None:
        """The biggest detected face (a portrait's subject), or ``None``; empty boxes are ignored."""
        faces = [face for face in self.detect(image) if face.area > 0]
        return max(faces, key=lambda face: face.area) if faces else None


# --- weight files -----------------------------------------------------------------------------------


def read_weight_file(path: Path, what: str, wrapper_keys: tuple[str, ...] = ("state_dict",)) -> dict:
    """The tensors of a pickled PyTorch weight file, read with ``weights_only=True`` (no code runs).

    A dict holding the state dict under one of ``wrapper_keys`` is unwrapped, and the ``module.``
    prefix that ``DataParallel`` training leaves on every key is removed.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # arbitrary bytes make the unpickler raise almost anything (KeyError, ...)
        reason = _load_failure(exc)
        if "global" in reason:  # "Unsupported global ...": the pickle names a class or function
            raise SadTalkerCheckpointError(
                f"{path.name} was not loaded: besides weights it holds Python objects ({reason}), and "
                f"loading those could run code. {_facexlib_hint(path)}"
            ) from exc
        raise SadTalkerCheckpointError(
            f"{path.name} could not be read as a PyTorch weight file ({reason}). It is damaged or is "
            f"not facexlib's {what}. {_facexlib_hint(path)}"
        ) from exc
    if isinstance(checkpoint, Mapping):
        for key in wrapper_keys:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise SadTalkerCheckpointError(
            f"{path.name} holds a {type(checkpoint).__name__}, not the weights of facexlib's {what}. "
            + _facexlib_hint(path)
        )
    state = {}
    for key, value in checkpoint.items():
        name = str(key)
        name = name[len("module.") :] if name.startswith("module.") else name
        state[name] = value
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise SadTalkerCheckpointError(
            f"{path.name} is not facexlib's {what}: entries that are not tensors: {_first(not_tensors)}. "
            + _facexlib_hint(path)
        )
    return state


def load_network(path: Path, build: Callable[[], Network], what: str, device: torch.device | str) -> Network:
    """Build a network on the meta device and fill it strictly from ``path`` (float32, eval, no grad).

    Every key and shape is compared first, so a wrong file is reported by name with the differences;
    BatchNorm's ``num_batches_tracked`` counters may be present or not (never used at inference).
    """
    path = Path(path)
    state = read_weight_file(path, what)
    with torch.device("meta"):
        network = build()
    expected = network.state_dict()
    counters = {key for key in expected if key.endswith(BATCH_COUNTER_SUFFIX)}
    missing = sorted(set(expected) - set(state) - counters)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{key} (file {list(state[key].shape)}, expected {list(expected[key].shape)})"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with the wrong shape: {_first(wrong)}")
    if problems:
        raise SadTalkerCheckpointError(
            f"{path.name} does not hold the weights of facexlib's {what}: {'; '.join(problems)}. "
            + _facexlib_hint(path)
        )
    tensors = {}
    for key in expected:
        if key in counters:
            tensors[key] = torch.zeros((), dtype=torch.long)
            continue
        value = state[key]
        tensors[key] = (value.to(torch.float32) if value.is_floating_point() else value).contiguous()
    network.load_state_dict(tensors, strict=True, assign=True)
    network.to(device).eval().requires_grad_(False)
    return network


def load_retinaface(path: Path, device: torch.device | str = "cpu") -> RetinaFaceDetector:
    """:class:`RetinaFaceDetector` with the weights of ``detection_Resnet50_Final.pth``."""
    network = load_network(path, RetinaFaceNet, "RetinaFace ResNet-50 face detector", device)
    return RetinaFaceDetector(network, device)


def _facexlib_hint(path: Path) -> str:
    return (
        f"Download {path.name} again from facexlib's release ({FACEXLIB_RELEASE}) to replace {path}, "
        "or remove that file to use the built-in fallback (OpenCV's face detector, a landmark template)."
    )


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else "")


def _load_failure(exc: BaseException) -> str:
    """The informative part of a ``torch.load`` error (its weights-only advice paragraphs dropped)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{type(exc).__name__}: {lines[0].split('. Please use', 1)[0]}"
    return text if len(text) <= 160 else text[:157] + "..."
