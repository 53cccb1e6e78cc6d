"""A faster evaluation of the face generator that computes the same function (to float rounding).

Built once per loaded generator from its weights (:func:`optimize_generator`); the original network
is left untouched. What changes, and why it does not change the result beyond float rounding:

* **BatchNorm folded into the convolution before it** (eval mode: ``bn(conv(x))`` is one affine
  map of ``x``): the stem, the 2-D down blocks, every 3-D hourglass block, the hourglass output and
  the motion estimator's compression. One pass over each large 3-D tensor is saved.
* **Spectral norm materialised**: in eval mode the legacy hook divides ``weight_orig`` by the same
  stored singular-value estimate at every call; it is divided once here.
* **SPADE fused**: the three label-map MLPs of a residual block read the same label map, so they run
  as one convolution; each norm's ``gamma`` and ``beta`` convolutions run as one; the label map is
  not re-interpolated when it already has the feature's size.
* **SPADE at upsampled sizes, computed at the label's size**: a 3x3 convolution of a nearest-
  upsampled (by ``s``) map equals, for each output phase, a convolution of the small map with the
  taps that fall on the same source pixel summed (at most 2x2). Phases that share a kernel are
  computed once. At 4x this is ~6x fewer multiply-adds for the largest SPADE convolutions.
* **Optional bfloat16** (``precision="bf16"``): autocast for the convolutions, the "fast" mode; its
  difference from float32 is measured by ``bench/talking_head.py``, not hidden.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.networks.blocks import (
    SPADE_LEAKY_SLOPE,
    ConvNormAct2d,
    Downsample2dBlock,
    Downsample3dBlock,
    HourglassDecoder3d,
    SpadeResidualBlock,
    SpatiallyAdaptiveNorm,
    Upsample3dBlock,
)

if TYPE_CHECKING:
    from sadtalker.networks.generator import WarpingSpadeGenerator

RenderPrecision = Literal["fp32", "bf16"]
_CONV_NORM_BLOCKS = (ConvNormAct2d, Downsample2dBlock, Downsample3dBlock, Upsample3dBlock, HourglassDecoder3d)


def _fold_batch_norm(conv: nn.Module, norm: nn.Module) -> None:
    """Make ``conv`` compute ``norm(conv(x))`` (eval-mode BatchNorm) and turn ``norm`` into identity."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    with torch.no_grad():
        conv.weight.mul_(scale.view(shape))
        new_bias = (bias - norm.running_mean) * scale + norm.bias
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _materialise_spectral_norm(module: nn.Module) -> None:
    for layer in module.modules():
        for hook in list(layer._forward_pre_hooks.values()):
            if type(hook).__name__ == "SpectralNorm":
                torch.nn.utils.remove_spectral_norm(layer)
                break


def _phase_classes(scale: int) -> list[tuple[list[int], int, int]]:
    """Output phases of a nearest-``scale`` upsample grouped by the low-res taps a 3x3 kernel reads:
    ``(phases, first offset, last offset)``."""
    classes: dict[tuple[int, int], list[int]] = {}
    for phase in range(scale):
        offsets = sorted({(phase + d) // scale for d in (-1, 0, 1)})
        classes.setdefault((offsets[0], offsets[-1]), []).append(phase)
    return [(phases, low, high) for (low, high), phases in classes.items()]


def _summed_kernel(
    weight: torch.Tensor, phase: int, scale: int, axis: int, low: int, high: int
) -> torch.Tensor:
    """The 3x3 kernel with the taps of one axis summed onto the low-res offsets ``low..high``."""
    parts = []
    for offset in range(low, high + 1):
        taps = [d + 1 for d in (-1, 0, 1) if (phase + d) // scale == offset]
        parts.append(
            weight.index_select(axis, torch.tensor(taps, device=weight.device)).sum(axis, keepdim=True)
        )
    return torch.cat(parts, dim=axis)


def upsampled_conv3x3(label: torch.Tensor, conv: nn.Conv2d, scale: int) -> torch.Tensor:
    """``conv(F.interpolate(label, scale_factor=scale, mode="nearest"))`` for a 3x3, padding-1 conv,
    computed at ``label``'s size (see the module docstring)."""
    batch, _, height, width = label.shape
    padded = F.pad(label, (1, 1, 1, 1))
    weight = conv.weight
    out = label.new_empty(batch, weight.shape[0], height * scale, width * scale)
    for row_phases, row_low, row_high in _phase_classes(scale):
        rows = _summed_kernel(weight, row_phases[0], scale, 2, row_low, row_high)
        for col_phases, col_low, col_high in _phase_classes(scale):
            kernel = _summed_kernel(rows, col_phases[0], scale, 3, col_low, col_high)
            window = padded[
                :,
                :,
                1 + row_low : 1 + row_low + height + row_high - row_low,
                1 + col_low : 1 + col_low + width + col_high - col_low,
            ]
            result = F.conv2d(window, kernel, conv.bias)
            for row in row_phases:
                for col in col_phases:
                    out[:, :, row::scale, col::scale] = result
    return out


class _FusedSpadeBlock(nn.Module):
    """A :class:`SpadeResidualBlock` with its label MLPs and gamma/beta convolutions fused."""

    def __init__(self, block: SpadeResidualBlock) -> None:
        super().__init__()
        self.learned_shortcut = block.learned_shortcut
        norms: list[SpatiallyAdaptiveNorm] = [block.norm_0, block.norm_1]
        if self.learned_shortcut:
            norms.append(block.norm_s)
        shared = [norm.mlp_shared[0] for norm in norms]
        self.hidden_channels = shared[0].out_channels
        self.shared = nn.Conv2d(shared[0].in_channels, self.hidden_channels * len(norms), 3, padding=1)
        with torch.no_grad():
            self.shared.weight.copy_(torch.cat([conv.weight for conv in shared]))
            self.shared.bias.copy_(torch.cat([conv.bias for conv in shared]))
        self.affine = nn.ModuleList()
        for norm in norms:
            conv = nn.Conv2d(self.hidden_channels, 2 * norm.mlp_gamma.out_channels, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.cat([norm.mlp_gamma.weight, norm.mlp_beta.weight]))
                conv.bias.copy_(torch.cat([norm.mlp_gamma.bias, norm.mlp_beta.bias]))
            self.affine.append(conv)
        self.conv_0, self.conv_1 = block.conv_0, block.conv_1
        self.conv_s = block.conv_s if self.learned_shortcut else None

    def _hidden(self, label_map: torch.Tensor, size: torch.Size) -> list[torch.Tensor]:
        if tuple(label_map.shape[2:]) == tuple(size):
            hidden = self.shared(label_map)
        else:
            scale = size[0] // label_map.shape[2]
            if scale * label_map.shape[2] == size[0] and scale * label_map.shape[3] == size[1] and scale > 1:
                hidden = upsampled_conv3x3(label_map, self.shared, scale)
            else:
                hidden = self.shared(F.interpolate(label_map, size=size, mode="nearest"))
        return list(F.relu(hidden).split(self.hidden_channels, dim=1))

    def _norm(self, x: torch.Tensor, hidden: torch.Tensor, index: int) -> torch.Tensor:
        gamma, beta = self.affine[index](hidden).chunk(2, dim=1)
        return torch.addcmul(beta, F.instance_norm(x, eps=1e-5), 1 + gamma)

    def forward(self, x: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(label_map, x.shape[2:])
        shortcut = self.conv_s(self._norm(x, hidden[2], 2)) if self.conv_s is not None else x
        out = self.conv_0(F.leaky_relu(self._norm(x, hidden[0], 0), SPADE_LEAKY_SLOPE))
        out = self.conv_1(F.leaky_relu(self._norm(out, hidden[1], 1), SPADE_LEAKY_SLOPE))
        return shortcut + out


class FastFaceGenerator(nn.Module):
    """The generator's ``encode_source``/``render`` interface over a fused copy of its weights."""

    def __init__(self, generator: WarpingSpadeGenerator, precision: RenderPrecision = "fp32") -> None:
        super().__init__()
        fused = copy.deepcopy(generator).eval()
        _materialise_spectral_norm(fused)
        for module in list(fused.modules()):
            if isinstance(module, _CONV_NORM_BLOCKS):
                _fold_batch_norm(module.conv, module.norm)
                module.norm = nn.Identity()
        motion = fused.dense_motion_network
        _fold_batch_norm(motion.compress, motion.norm)
        motion.norm = nn.Identity()
        decoder = fused.decoder
        for name, child in list(decoder.named_children()):
            if isinstance(child, SpadeResidualBlock):
                setattr(decoder, name, _FusedSpadeBlock(child))
        if precision == "bf16":
            # The motion field, the warp and the occlusion stay float32: sampling grids need the
            # precision. The 2-D stages after the warp (most of the cost) run in bfloat16.
            fused.third, fused.fourth = _Bfloat16(fused.third), _Bfloat16(fused.fourth)
            fused.decoder = _Bfloat16(decoder)
        self.generator = fused.requires_grad_(False)
        self.precision = precision

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        return self.generator.encode_source(source_image)

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self.generator.render(source_volume, driving_kp, source_kp)


class _Bfloat16(nn.Module):
    """Runs a 2-D stage under bfloat16 autocast and hands float32 on (the "fast" render mode)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(args[0].device.type, dtype=torch.bfloat16):
            return self.inner(*args).float()


def optimize_generator(
    generator: WarpingSpadeGenerator, precision: RenderPrecision = "fp32"
) -> FastFaceGenerator:
    """A :class:`FastFaceGenerator` for ``generator`` (which must be in eval mode; it is not changed)."""
    if generator.training:
        raise ValueError("optimize_generator needs the generator in eval mode (BatchNorm running statistics)")
    return FastFaceGenerator(generator, precision)
