"""Layers shared by the face-render networks (keypoint detector, dense motion estimator, generator).

Attribute names such as ``conv``, ``norm``, ``conv1`` or ``mlp_shared`` are not style choices: they are
the key names of the official SadTalker checkpoints and must stay exactly as they are. The official
models used a synchronised BatchNorm for multi-GPU training; it stores the same state-dict entries and
behaves like ``nn.BatchNorm`` in eval mode, so plain BatchNorm is used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

# Slope of the leaky ReLU inside the SPADE decoder (the official decoder uses 0.2 throughout).
SPADE_LEAKY_SLOPE = 0.2


def normalized_axis(size: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``size`` evenly spaced positions from -1 to 1 inclusive (the keypoints' coordinate frame)."""
    return torch.arange(size, device=device, dtype=dtype) / (size - 1) * 2 - 1


def coordinate_grid_3d(
    depth: int, height: int, width: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """A ``(depth, height, width, 3)`` grid holding the normalised ``(x, y, z)`` of every voxel.

    ``x`` runs along the width, ``y`` along the height and ``z`` along the depth, which is the
    order ``F.grid_sample`` expects for 5-D inputs, so the flows built from it can be sampled directly.
    """
    z = normalized_axis(depth, device=device, dtype=dtype)
    y = normalized_axis(height, device=device, dtype=dtype)
    x = normalized_axis(width, device=device, dtype=dtype)
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


def keypoint_gaussians(
    keypoints: torch.Tensor, spatial_size: tuple[int, int, int], variance: float
) -> torch.Tensor:
    """Render each keypoint ``(bs, K, 3)`` as an isotropic Gaussian blob: ``(bs, K, d, h, w)``."""
    depth, height, width = spatial_size
    grid = coordinate_grid_3d(depth, height, width, device=keypoints.device, dtype=keypoints.dtype)
    batch, count, _ = keypoints.shape
    offsets = grid.view(1, 1, depth, height, width, 3) - keypoints.view(batch, count, 1, 1, 1, 3)
    return torch.exp(-0.5 * offsets.pow(2).sum(-1) / variance)


class ConvNormAct2d(nn.Module):
    """Conv2d -> BatchNorm -> ReLU (or leaky ReLU), keeping the spatial size."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, leaky: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels)
        self.leaky = leaky

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv(x))
        # The official block uses nn.LeakyReLU() with its default slope of 0.01.
        return F.leaky_relu(out, 0.01) if self.leaky else F.relu(out)


class Downsample2dBlock(nn.Module):
    """Conv2d -> BatchNorm -> ReLU -> 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), kernel_size=2)


class Downsample3dBlock(nn.Module):
    """Conv3d -> BatchNorm -> ReLU -> average pooling that halves height and width (depth is kept)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.relu(self.norm(self.conv(x))), kernel_size=(1, 2, 2))


class Upsample3dBlock(nn.Module):
    """Nearest 2x upsampling of height and width -> Conv3d -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.relu(self.norm(self.conv(out)))


class PreActResBlock3d(nn.Module):
    """Residual 3-D block with the normalisation before each convolution (norm-relu-conv twice)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + x


def hourglass_width(block_expansion: int, level: int, max_features: int) -> int:
    """Channel count of an hourglass level: doubling per level from ``block_expansion``, capped."""
    return min(max_features, block_expansion * (2**level))


class HourglassEncoder3d(nn.Module):
    def __init__(self, block_expansion: int, in_channels: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(
            Downsample3dBlock(
                in_channels if level == 0 else hourglass_width(block_expansion, level, max_features),
                hourglass_width(block_expansion, level + 1, max_features),
            )
            for level in range(num_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The input followed by every level's output, shallowest first (the decoder's skips)."""
        levels = [x]
        for block in self.down_blocks:
            levels.append(block(levels[-1]))
        return levels


class HourglassDecoder3d(nn.Module):
    def __init__(self, block_expansion: int, in_channels: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        blocks = []
        for level in reversed(range(num_blocks)):
            # The deepest level receives the bottleneck alone; the others also the concatenated skip.
            multiplier = 1 if level == num_blocks - 1 else 2
            blocks.append(
                Upsample3dBlock(
                    multiplier * hourglass_width(block_expansion, level + 1, max_features),
                    hourglass_width(block_expansion, level, max_features),
                )
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.out_channels = block_expansion + in_channels
        self.conv = nn.Conv3d(self.out_channels, self.out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm3d(self.out_channels)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        skips = list(levels)
        out = skips.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return F.relu(self.norm(self.conv(out)))


class Hourglass3d(nn.Module):
    """3-D U-Net ("hourglass") whose output concatenates the full-resolution input as a skip."""

    def __init__(self, block_expansion: int, in_channels: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        self.encoder = HourglassEncoder3d(block_expansion, in_channels, num_blocks, max_features)
        self.decoder = HourglassDecoder3d(block_expansion, in_channels, num_blocks, max_features)
        self.out_channels = self.decoder.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class GaussianDownsampler(nn.Module):
    """Blur with a Gaussian, then keep every n-th pixel: anti-aliased downscaling by ``scale`` (1/n).

    The kernel is a *persistent buffer* named ``weight`` because the official checkpoint stores it.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1
        self.pad_before = size // 2
        self.pad_after = self.pad_before - 1 if size % 2 == 0 else self.pad_before
        positions = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        profile = torch.exp(-(positions**2) / (2 * sigma**2))
        kernel = torch.outer(profile, profile)
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.channels = channels
        self.stride = int(1 / scale)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return x
        padded = F.pad(x, (self.pad_before, self.pad_after, self.pad_before, self.pad_after))
        blurred = F.conv2d(padded, self.weight, groups=self.channels)
        return blurred[:, :, :: self.stride, :: self.stride]


class SpatiallyAdaptiveNorm(nn.Module):
    """SPADE: parameter-free instance norm, then a per-pixel scale and shift predicted from a label map."""

    def __init__(self, channels: int, label_channels: int, hidden_channels: int = 128) -> None:
        super().__init__()
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_channels, hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.mlp_gamma = nn.Conv2d(hidden_channels, channels, kernel_size=3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)
        label_map = F.interpolate(label_map, size=x.shape[2:], mode="nearest")
        hidden = self.mlp_shared(label_map)
        return normalized * (1 + self.mlp_gamma(hidden)) + self.mlp_beta(hidden)


class SpadeResidualBlock(nn.Module):
    """Residual block of two SPADE-normalised 3x3 convs, with a learned 1x1 shortcut when widths differ.

    The convolutions use the *legacy* ``torch.nn.utils.spectral_norm`` hook, whose state-dict entries
    (``weight_orig``, ``weight_u``, ``weight_v``) are what the official checkpoint stores. In eval mode
    it divides ``weight_orig`` by the singular value estimated from the stored ``u``/``v`` vectors.
    """

    def __init__(self, in_channels: int, out_channels: int, label_channels: int) -> None:
        super().__init__()
        self.learned_shortcut = in_channels != out_channels
        middle = min(in_channels, out_channels)
        self.conv_0 = spectral_norm(nn.Conv2d(in_channels, middle, kernel_size=3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(middle, out_channels, kernel_size=3, padding=1))
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.norm_0 = SpatiallyAdaptiveNorm(in_channels, label_channels)
        self.norm_1 = SpatiallyAdaptiveNorm(middle, label_channels)
        if self.learned_shortcut:
            self.norm_s = SpatiallyAdaptiveNorm(in_channels, label_channels)

    def forward(self, x: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, label_map)) if self.learned_shortcut else x
        out = self.conv_0(F.leaky_relu(self.norm_0(x, label_map), SPADE_LEAKY_SLOPE))
        out = self.conv_1(F.leaky_relu(self.norm_1(out, label_map), SPADE_LEAKY_SLOPE))
        return shortcut + out
