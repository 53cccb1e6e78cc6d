"""3-D face reconstruction network (checkpoint prefix ``face_3drecon``).

A ResNet-50 trunk followed by seven 1x1 heads that regress the 257 coefficients of a Basel-Face-Model
fit (the Deep3DFaceRecon layout) from an aligned 224x224 face crop. The preprocessing uses the
expression, rotation and translation (plus, for the full modes, crop) coefficients as the source
face's 3DMM description.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Head order and widths of the regressed coefficient vector.
COEFFICIENT_GROUPS: tuple[tuple[str, int], ...] = (
    ("identity", 80),
    ("expression", 64),
    ("texture", 80),
    ("angle", 3),
    ("gamma", 27),
    ("translation_xy", 2),
    ("translation_z", 1),
)
FACE_COEFFICIENT_COUNT = sum(width for _, width in COEFFICIENT_GROUPS)


class BottleneckBlock(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, x4 expansion) with the stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet50Trunk(nn.Module):
    """ResNet-50 without its classifier: image -> globally pooled ``(bs, 2048, 1, 1)`` features."""

    def __init__(self, blocks_per_stage: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), blocks_per_stage, strict=True)):
            stride = 1 if stage == 0 else 2
            layers = []
            for index in range(blocks):
                layers.append(BottleneckBlock(channels, width, stride if index == 0 else 1))
                channels = width * BottleneckBlock.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        for stage in range(1, 5):
            out = getattr(self, f"layer{stage}")(out)
        return F.adaptive_avg_pool2d(out, 1)


class FaceReconstructionNet(nn.Module):
    """Aligned face crop ``(bs, 3, 224, 224)`` in [0, 1] -> 257 3DMM coefficients ``(bs, 257)``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet50Trunk()
        self.final_layers = nn.ModuleList(
            nn.Conv2d(self.backbone.out_channels, width, kernel_size=1) for _, width in COEFFICIENT_GROUPS
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        return torch.cat([head(features) for head in self.final_layers], dim=1).flatten(1)


def split_face_coefficients(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """Name the groups of a ``(..., 257)`` coefficient vector (see :data:`COEFFICIENT_GROUPS`)."""
    names = [name for name, _ in COEFFICIENT_GROUPS]
    widths = [width for _, width in COEFFICIENT_GROUPS]
    return dict(zip(names, torch.split(coefficients, widths, dim=-1), strict=True))
