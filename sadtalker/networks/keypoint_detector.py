"""Canonical 3-D keypoint detector (checkpoint prefix ``kp_extractor``).

It predicts, from the source portrait, 15 implicit 3-D keypoints in a pose-free canonical frame; the
renderer later rotates, translates and offsets them with the head pose and expression of every frame.
Hyper-parameters default to the official ``facerender.yaml`` (``kp_detector_params``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.networks.blocks import (
    Downsample2dBlock,
    GaussianDownsampler,
    Upsample3dBlock,
    coordinate_grid_3d,
    hourglass_width,
)


class KeypointHourglass(nn.Module):
    """2-D encoder whose bottleneck is reshaped into a 3-D volume and decoded with 3-D convolutions."""

    def __init__(
        self,
        block_expansion: int,
        in_channels: int,
        bottleneck_channels: int,
        depth: int,
        num_blocks: int,
        max_features: int,
    ) -> None:
        super().__init__()
        self.down_blocks = nn.Sequential()
        for level in range(num_blocks):
            self.down_blocks.add_module(
                f"down{level}",
                Downsample2dBlock(
                    in_channels if level == 0 else hourglass_width(block_expansion, level, max_features),
                    hourglass_width(block_expansion, level + 1, max_features),
                ),
            )
        self.conv = nn.Conv2d(
            hourglass_width(block_expansion, num_blocks, max_features), bottleneck_channels, kernel_size=1
        )
        self.up_blocks = nn.Sequential()
        for step in range(num_blocks):
            self.up_blocks.add_module(
                f"up{step}",
                Upsample3dBlock(
                    hourglass_width(block_expansion, num_blocks - step, max_features),
                    hourglass_width(block_expansion, num_blocks - step - 1, max_features),
                ),
            )
        self.depth = depth
        self.out_channels = hourglass_width(block_expansion, 0, max_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.down_blocks(x))
        batch, channels, height, width = out.shape
        out = out.view(batch, channels // self.depth, self.depth, height, width)
        return self.up_blocks(out)


class CanonicalKeypointDetector(nn.Module):
    """Image ``(bs, 3, H, W)`` in [0, 1] -> canonical keypoints ``(bs, num_kp, 3)`` in [-1, 1]."""

    def __init__(
        self,
        num_kp: int = 15,
        image_channels: int = 3,
        block_expansion: int = 32,
        max_features: int = 1024,
        bottleneck_channels: int = 16384,
        depth: int = 16,
        num_blocks: int = 5,
        temperature: float = 0.1,
        scale_factor: float = 0.25,
    ) -> None:
        super().__init__()
        self.predictor = KeypointHourglass(
            block_expansion, image_channels, bottleneck_channels, depth, num_blocks, max_features
        )
        self.kp = nn.Conv3d(self.predictor.out_channels, num_kp, kernel_size=3, padding=1)
        self.temperature = temperature
        self.scale_factor = scale_factor
        if scale_factor != 1:
            self.down = GaussianDownsampler(image_channels, scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.scale_factor != 1:
            image = self.down(image)
        logits = self.kp(self.predictor(image))
        batch, count, depth, height, width = logits.shape
        # Spatial softmax per keypoint, then the expected position under that distribution.
        heatmap = F.softmax(logits.view(batch, count, -1) / self.temperature, dim=2)
        grid = coordinate_grid_3d(depth, height, width, device=logits.device, dtype=logits.dtype)
        return heatmap @ grid.view(-1, 3)
