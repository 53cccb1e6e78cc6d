"""98-point AWing FAN face alignment (facexlib's ``alignment_WFLW_4HG.pth``) and the 98 -> 68 conversion.

SadTalker's reference crops the photo to RetinaFace's box, runs facexlib's AWing FAN on it and turns
the 98 WFLW points into the 68 iBUG 300-W points its crop and 3DMM fit use (facts from
OpenTalker/SadTalker ``src/face3d/extract_kp_videos_safe.py`` and facexlib ``alignment/``). This is our
own implementation, with the weight file's module names:

* Input: the face crop resized (bilinear) to 256 x 256, RGB in [0, 1].
* ``conv1``: a CoordConv (the image plus row, column and radius coordinate channels, 6 in all) 7x7
  stride 2 to 64 channels, then ``bn1`` + ReLU; ``conv2`` (64 -> 128 pre-activation block), 2x2 average
  pool, ``conv3`` (128 -> 128), ``conv4`` (128 -> 256): 64 x 64 features.
* Four stacked hourglasses ``m0``-``m3`` (depth 4, 256 channels, average-pool down / nearest up), each
  starting with a 1x1 CoordConv; from the second on it also gets the coordinates masked by the
  previous stage's boundary heatmap (its last channel > 0.05). After each: ``top_m_i``,
  ``conv_last_i`` + ``bn_end_i`` + ReLU and ``l_i``: 98 landmark heatmaps plus 1 boundary heatmap.
  Between stages, ``bl_i`` (features) and ``al_i`` (heatmaps) are added back to the stage input.
* Blocks (``ConvBlock``): BN-ReLU-3x3 conv to half the channels, then to a quarter, then a quarter
  again, the three concatenated plus the input (through BN-ReLU-1x1 when the widths differ).
* Points: each heatmap's maximum, moved a quarter cell towards the larger neighbour in x and in y,
  plus half a cell, times crop size / 64, plus the crop's corner.

The file holds the state dict under ``state_dict``. Deviations: the reference passed SadTalker's RGB
crops to a function that expects BGR (so the network saw BGR); we give the network RGB, as facexlib
intends. At the heatmap's border the missing neighbour counts as the map's lowest value, so the point
moves inwards (the reference read a cell of the next row, or a fixed corner cell, there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.errors import SadTalkerError
from sadtalker.face_detection import FACEXLIB_RELEASE, load_network

ALIGNMENT_FILE = "alignment_WFLW_4HG.pth"
INPUT_SIZE = 256
HEATMAP_SIZE = 64
WFLW_POINTS = 98
HOURGLASSES = 4
HOURGLASS_DEPTH = 4
FEATURES = 256
# A heatmap cell is "on the boundary" when the boundary channel exceeds this.
BOUNDARY_THRESHOLD = 0.05

# The 68 iBUG points as the mean of one or two WFLW points (facexlib's convert_98_to_68 mapping):
# jaw every other contour point, brows from the upper/lower brow pairs, nose, six points per eye
# (skipping WFLW's mid-lid points 62/66 and 70/74) and the 20 mouth points.
_WFLW_TO_IBUG: tuple[tuple[int, int], ...] = (
    *((2 * i, 2 * i) for i in range(17)),
    (33, 33),
    (34, 41),
    (35, 40),
    (36, 39),
    (37, 38),
    (42, 50),
    (43, 49),
    (44, 48),
    (45, 47),
    (46, 46),
    *((i, i) for i in range(51, 60)),
    *((i, i) for i in (60, 61, 63, 64, 65, 67)),
    *((i, i) for i in (68, 69, 71, 72, 73, 75)),
    *((i, i) for i in range(76, 96)),
)


def landmarks_98_to_68(points: np.ndarray) -> np.ndarray:
    """WFLW 98 points ``(98, 2)`` -> iBUG 300-W 68 points ``(68, 2)`` (float32)."""
    points = np.asarray(points, dtype=np.float32)
    if points.shape != (WFLW_POINTS, 2):
        raise ValueError(f"expected (98, 2) landmarks, got {points.shape}")
    first, second = (np.array(indices) for indices in zip(*_WFLW_TO_IBUG, strict=True))
    return ((points[first] + points[second]) / 2).astype(np.float32)


def heatmap_points(heatmaps: np.ndarray) -> np.ndarray:
    """``(n, h, w)`` heatmaps -> ``(n, 2)`` points (x, y) in heatmap cells, cell ``i`` spanning ``[i, i+1)``.

    The maximum's cell, moved 0.25 towards the larger of its two neighbours along each axis (not at
    all when they are equal), plus 0.5 to reach the cell's centre.
    """
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    count, height, width = heatmaps.shape
    peaks = heatmaps.reshape(count, -1).argmax(axis=1)
    ys, xs = np.divmod(peaks, width)
    rows = np.arange(count)
    right = heatmaps[rows, ys, np.minimum(xs + 1, width - 1)]
    left = heatmaps[rows, ys, np.maximum(xs - 1, 0)]
    below = heatmaps[rows, np.minimum(ys + 1, height - 1), xs]
    above = heatmaps[rows, np.maximum(ys - 1, 0), xs]
    # A neighbour beyond the border counts as the map's lowest value: the point moves inwards.
    lowest = heatmaps.reshape(count, -1).min(axis=1)
    right = np.where(xs + 1 < width, right, lowest)
    left = np.where(xs > 0, left, lowest)
    below = np.where(ys + 1 < height, below, lowest)
    above = np.where(ys > 0, above, lowest)
    points = np.stack([xs, ys], axis=1).astype(np.float32)
    points += 0.25 * np.sign(np.stack([right - left, below - above], axis=1))
    return points + 0.5


# --- the network ----------------------------------------------------------------------------------


def coordinate_channels(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column coordinates in [-1, 1] and their radius (scaled to max 1), each ``(bs, 1, h, w)``."""
    batch, _, height, width = like.shape
    rows = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    radius = torch.sqrt(grid_rows**2 + grid_cols**2)
    radius = radius / radius.max()
    shape = (batch, 1, height, width)
    return grid_rows.expand(shape), grid_cols.expand(shape), radius.expand(shape)


class CoordConv(nn.Module):
    """A conv over the input plus coordinate channels (row, column, radius).

    With ``boundary`` the row/column channels masked by the previous stage's boundary heatmap are
    appended too (two more input channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        boundary: bool = False,
    ) -> None:
        super().__init__()
        self.boundary = boundary
        extra = 3 + (2 if boundary else 0)
        self.conv = nn.Conv2d(in_channels + extra, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor, heatmaps: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols, radius = coordinate_channels(x)
        parts = [x, rows, cols, radius]
        if self.boundary:
            if heatmaps is None:
                raise ValueError("this CoordConv needs the previous stage's heatmaps")
            on_boundary = heatmaps[:, -1:].clamp(0.0, 1.0) > BOUNDARY_THRESHOLD
            parts += [rows * on_boundary, cols * on_boundary]
        return self.conv(torch.cat(parts, dim=1))


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation block: three chained 3x3 convs (1/2, 1/4, 1/4 of the width), concatenated, + input."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half, quarter = out_channels // 2, out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = conv3x3(quarter, quarter)
        self.downsample: nn.Sequential | None = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv1(F.relu(self.bn1(x)))
        second = self.conv2(F.relu(self.bn2(first)))
        third = self.conv3(F.relu(self.bn3(second)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.cat([first, second, third], dim=1) + shortcut


class Hourglass(nn.Module):
    """A CoordConv then a recursive hourglass: ``b1_L`` at this scale plus ``b2_L`` -> (level L-1 or
    ``b2_plus_1``) -> ``b3_L`` at half the scale, upsampled."""

    def __init__(self, depth: int, channels: int, boundary: bool) -> None:
        super().__init__()
        self.depth = depth
        self.coordconv = CoordConv(channels, channels, kernel_size=1, boundary=boundary)
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))
        self.b2_plus_1 = ConvBlock(channels, channels)

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = getattr(self, f"b1_{level}")(x)
        lower = getattr(self, f"b2_{level}")(F.avg_pool2d(x, 2, stride=2))
        lower = self._level(level - 1, lower) if level > 1 else self.b2_plus_1(lower)
        lower = getattr(self, f"b3_{level}")(lower)
        return upper + F.interpolate(lower, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, heatmaps: torch.Tensor | None) -> torch.Tensor:
        return self._level(self.depth, self.coordconv(x, heatmaps))


class AwingFan(nn.Module):
    """RGB face crop ``(bs, 3, 256, 256)`` in [0, 1] -> the last stage's heatmaps ``(bs, 99, 64, 64)``
    (98 landmarks, then the boundary map)."""

    def __init__(self, hourglasses: int = HOURGLASSES, landmarks: int = WFLW_POINTS) -> None:
        super().__init__()
        self.hourglasses = hourglasses
        maps = landmarks + 1
        self.conv1 = CoordConv(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, FEATURES)
        for index in range(hourglasses):
            self.add_module(f"m{index}", Hourglass(HOURGLASS_DEPTH, FEATURES, boundary=index > 0))
            self.add_module(f"top_m_{index}", ConvBlock(FEATURES, FEATURES))
            self.add_module(f"conv_last{index}", nn.Conv2d(FEATURES, FEATURES, kernel_size=1))
            self.add_module(f"bn_end{index}", nn.BatchNorm2d(FEATURES))
            self.add_module(f"l{index}", nn.Conv2d(FEATURES, maps, kernel_size=1))
            if index < hourglasses - 1:
                self.add_module(f"bl{index}", nn.Conv2d(FEATURES, FEATURES, kernel_size=1))
                self.add_module(f"al{index}", nn.Conv2d(maps, FEATURES, kernel_size=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(image)))
        x = F.avg_pool2d(self.conv2(x), 2, stride=2)
        features = self.conv4(self.conv3(x))
        heatmaps: torch.Tensor | None = None
        for index in range(self.hourglasses):
            out = getattr(self, f"m{index}")(features, heatmaps)
            out = getattr(self, f"top_m_{index}")(out)
            out = F.relu(getattr(self, f"bn_end{index}")(getattr(self, f"conv_last{index}")(out)))
            heatmaps = getattr(self, f"l{index}")(out)
            if index < self.hourglasses - 1:
                features = features + getattr(self, f"bl{index}")(out) + getattr(self, f"al{index}")(heatmaps)
        assert heatmaps is not None
        return heatmaps


# --- running it -----------------------------------------------------------------------------------


def crop_box(
    box: tuple[float, float, float, float], image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A detection box as integer pixel bounds (truncated, as the reference), clipped to the photo."""
    width, height = image_size
    x1, y1, x2, y2 = (int(value) for value in box)
    return max(0, x1), max(0, y1), min(width, x2), min(height, y2)


class AwingAligner:
    """Places 98 (or 68) landmarks in a face box with :class:`AwingFan`."""

    name = "awing"

    def __init__(self, network: AwingFan, device: torch.device | str = "cpu", source: str = ALIGNMENT_FILE):
        self.network = network
        self.device = torch.device(device)
        self.source = source

    def landmarks_98(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """98 points ``(98, 2)`` in photo pixels for the face in ``box`` of an RGB photo; ``None`` if the
        box holds less than 2 x 2 pixels of the photo."""
        import cv2

        x1, y1, x2, y2 = crop_box(box, (image.shape[1], image.shape[0]))
        if x2 - x1 < 2 or y2 - y1 < 2:
            return None
        crop = cv2.resize(np.ascontiguousarray(image[y1:y2, x1:x2]), (INPUT_SIZE, INPUT_SIZE))
        tensor = torch.from_numpy(crop).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255.0
        with torch.no_grad():
            heatmaps = self.network(tensor)[0, :WFLW_POINTS].float().cpu().numpy()
        if not np.isfinite(heatmaps).all():
            raise SadTalkerError(
                f"The face landmark network ({self.source}) produced invalid values. The file may be "
                f"damaged: download it again from {FACEXLIB_RELEASE}, or remove it to use the "
                "built-in fallback (a landmark template)."
            )
        scale = np.array([(x2 - x1) / heatmaps.shape[2], (y2 - y1) / heatmaps.shape[1]], dtype=np.float32)
        return heatmap_points(heatmaps) * scale + np.array([x1, y1], dtype=np.float32)

    def landmarks_68(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """The 68 iBUG points ``(68, 2)`` for the face in ``box``, or ``None`` (see :meth:`landmarks_98`)."""
        points = self.landmarks_98(image, box)
        return None if points is None else landmarks_98_to_68(points)


def load_awing(path: Path, device: torch.device | str = "cpu") -> AwingAligner:
    """:class:`AwingAligner` with the weights of ``alignment_WFLW_4HG.pth`` (under ``state_dict``)."""
    network = load_network(path, AwingFan, "AWing FAN face landmark network", device)
    return AwingAligner(network, device, source=Path(path).name)
