"""Mapping network: a window of 3DMM coefficients -> head pose and keypoint expression offsets.

Stored outside the main checkpoint, in ``mapping_00229-model.pth.tar`` (70 coefficients per frame:
64 expression + 3 rotation + 3 translation; used for the crop/extcrop/resize modes) and
``mapping_00109-model.pth.tar`` (73: the same plus 3 crop parameters; used for full/extfull).
Hyper-parameters default to the official ``facerender.yaml`` (``mapping_params``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The two coefficient layouts the official mapping checkpoints were trained on.
MAPPING_COEFFICIENT_COUNTS = (70, 73)


class HeadMotion(NamedTuple):
    """Raw mapping outputs for a batch: pose as logits over angle bins, translation, expression offsets."""

    yaw: torch.Tensor  # (bs, num_bins) logits
    pitch: torch.Tensor  # (bs, num_bins) logits
    roll: torch.Tensor  # (bs, num_bins) logits
    t: torch.Tensor  # (bs, 3)
    exp: torch.Tensor  # (bs, 3 * num_kp)


class MappingNet(nn.Module):
    """``(bs, coeff_count, window)`` coefficients -> :class:`HeadMotion`.

    A 7-tap convolution then three dilated 3-tap residual convolutions over the time window (27
    frames centred on the target frame in the official pipeline), average-pooled to one descriptor.
    """

    def __init__(
        self,
        coeff_count: int = 70,
        descriptor_channels: int = 1024,
        layers: int = 3,
        num_kp: int = 15,
        num_bins: int = 66,
    ) -> None:
        super().__init__()
        self.coeff_count = coeff_count
        self.layers = layers
        self.first = nn.Sequential(nn.Conv1d(coeff_count, descriptor_channels, kernel_size=7))
        for index in range(layers):
            self.add_module(
                f"encoder{index}",
                nn.Sequential(
                    nn.LeakyReLU(0.1),
                    nn.Conv1d(descriptor_channels, descriptor_channels, kernel_size=3, dilation=3),
                ),
            )
        self.fc_roll = nn.Linear(descriptor_channels, num_bins)
        self.fc_pitch = nn.Linear(descriptor_channels, num_bins)
        self.fc_yaw = nn.Linear(descriptor_channels, num_bins)
        self.fc_t = nn.Linear(descriptor_channels, 3)
        self.fc_exp = nn.Linear(descriptor_channels, 3 * num_kp)

    def forward(self, coefficients: torch.Tensor) -> HeadMotion:
        out = self.first(coefficients)
        for index in range(self.layers):
            # Each dilated conv trims 3 steps per side; the residual is cropped to match.
            out = getattr(self, f"encoder{index}")(out) + out[:, :, 3:-3]
        descriptor = F.adaptive_avg_pool1d(out, 1).flatten(1)
        return HeadMotion(
            yaw=self.fc_yaw(descriptor),
            pitch=self.fc_pitch(descriptor),
            roll=self.fc_roll(descriptor),
            t=self.fc_t(descriptor),
            exp=self.fc_exp(descriptor),
        )
