"""A faster evaluation of the face generator that computes the same function (to float rounding).

Built once per loaded generator from its weights (:func:`optimize_generator`); the original network
is left untouched. What changes, and why it does not change the result beyond float rounding:

* **BatchNorm folded into the convolution before it** (eval mode: ``bn(conv(x))`` is one affine
  map of ``x``): the stem, the 2-D down blocks, every 3-D hourglass block, the hourglass output and
  the motion estimator's compression. One pass over each large 3-D tensor is saved.
* **Spectral norm materialised**: in eval mode the legacy hook divides ``weight_orig`` by the same
  stored singular-value estimate at every call; it is divided once here.
* **SPADE fused**: the three label-map MLPs of a residual block read the same label map, so they run
  as one convolution; the label map is not re-interpolated when it already has the feature's size;
  the ``1 +`` of ``1 + gamma`` is added to the gamma convolution's bias.
* **Convolutions of nearest-upsampled maps computed at the small size**: a 3x3 (or 3x3x3)
  convolution of a map upsampled by ``s`` equals, for each output phase, a convolution of the small
  map with the taps that fall on the same source pixel summed (at most 2 per axis). Phases that
  share a kernel are computed once. At 4x this is ~6x fewer multiply-adds for the largest SPADE
  convolutions; the 3-D hourglass's upsampling blocks do 12 instead of 27 taps per voxel. Nothing is
  upsampled: the instance norm of an upsampled map is the upsampled instance norm (same statistics),
  applied by broadcasting, and a ReLU after the convolution is applied to the small phase results.
* **The 4x block's SPADE convolutions on compressed maps**: the hidden map of a label upsampled 4x
  has equal phases 1 and 2 along each axis (they read the same label pixels), so it is stored with
  3 instead of 4 rows and columns per label pixel, and each output phase of its gamma/beta
  convolution is one stride-3 convolution of that map with the taps that read the same stored
  value summed: 100 instead of 144 tap-phases (~30% fewer multiply-adds for the block's largest
  convolutions), written straight into the modulated map.
* **Learned SPADE shortcut composed**: ``conv_s`` (1x1, linear) of ``x * gamma + beta`` is
  ``conv_s(x * gamma) + (conv_s o beta-conv)(hidden)``; the composed 3x3 convolution has ``conv_s``'s
  (fewer) output channels, which saves up to 3/4 of the beta convolution of the up-sampling blocks.
* **Channels-last memory formats** (``channels_last``/``channels_last_3d``) for the 3-D hourglass and
  the two up-sampling SPADE blocks, which oneDNN convolves without reordering (the middle blocks
  stay plain: see ``_DECODER_FORMATS``), in-place elementwise work on the convolutions' outputs
  (a new large tensor costs page faults), the hourglass's skip concatenation written in place,
  average pooling as a 2-D pool over the depth-merged batch, BatchNorm's statistics kernel for the
  instance norms, separable keypoint Gaussians, and the motion estimator's source-only work
  (compression, identity warp, source Gaussians) done once when the batch shares one source (the
  renderer passes it expanded).
* **Optional bfloat16** (``precision="bf16"``): autocast for the 2-D stages, the "fast" mode; its
  difference from float32 is measured by ``bench/talking_head.py``, not hidden.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sadtalker.networks.blocks import (
    SPADE_LEAKY_SLOPE,
    ConvNormAct2d,
    Downsample2dBlock,
    Downsample3dBlock,
    Hourglass3d,
    HourglassDecoder3d,
    SpadeResidualBlock,
    SpatiallyAdaptiveNorm,
    Upsample3dBlock,
    coordinate_grid_3d,
    normalized_axis,
)
from sadtalker.networks.generator import KEYPOINT_VARIANCE, MASK_FLOOR, warp_volume

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sadtalker.networks.generator import DenseMotionEstimator, SpadeImageDecoder, WarpingSpadeGenerator

RenderPrecision = Literal["fp32", "bf16"]
_CONV_NORM_BLOCKS = (ConvNormAct2d, Downsample2dBlock, Downsample3dBlock, Upsample3dBlock, HourglassDecoder3d)
_INSTANCE_NORM_EPS = 1e-5
# Compute the SPADE norms of blocks whose label map is upsampled with repeating phases (4x: the last
# block) phase by phase from compressed hidden maps (see _FusedSpadeBlock._forward_structured).
_STRUCTURED_SPADE = True
# The leaky ReLU slope of the generator's ``third`` block (nn.LeakyReLU's default).
_THIRD_LEAKY_SLOPE = 0.01


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


def _empty_like_format(
    like: torch.Tensor, shape: tuple[int, ...], memory_format: torch.memory_format
) -> torch.Tensor:
    """An uninitialised tensor with ``like``'s dtype and device, allocated in ``memory_format``
    (``new_empty(...).contiguous(...)`` would copy it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _channels_last(dims: int) -> torch.memory_format:
    return torch.channels_last if dims == 4 else torch.channels_last_3d


def _format_of(tensor: torch.Tensor) -> torch.memory_format:
    """``channels_last``(``_3d``) when ``tensor`` is stored so (and not also plainly), else contiguous."""
    if tensor.is_contiguous():
        return torch.contiguous_format
    cl = _channels_last(tensor.dim())
    return cl if tensor.is_contiguous(memory_format=cl) else torch.contiguous_format


def _set_memory_format(module: nn.Module, memory_format: torch.memory_format) -> None:
    """Store the weights of every convolution in ``module`` in ``memory_format``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            layer.weight.data = layer.weight.data.contiguous(memory_format=memory_format)


# --- convolutions of nearest-upsampled maps, computed at the small size -------------------------------


def _phase_classes(scale: int) -> list[tuple[list[int], int, int]]:
    """Output phases of a nearest-``scale`` upsample grouped by the low-res taps a 3-tap kernel reads:
    ``(phases, first offset, last offset)``."""
    classes: dict[tuple[int, int], list[int]] = {}
    for phase in range(scale):
        offsets = sorted({(phase + d) // scale for d in (-1, 0, 1)})
        classes.setdefault((offsets[0], offsets[-1]), []).append(phase)
    return [(phases, low, high) for (low, high), phases in classes.items()]


@dataclass(frozen=True)
class _PhaseKernel:
    """One group of output phases: their kernel, the padding that lines its window up, the crop of the
    convolution's output (start per axis) and the phases (a range per axis) it fills."""

    weight: torch.Tensor
    padding: tuple[int, ...]
    crop: tuple[int, ...]
    phases: tuple[slice, ...]


def _phase_kernels(
    weight: torch.Tensor, scales: tuple[int, ...], compressed: bool = False
) -> list[_PhaseKernel]:
    """The kernels of a padding-1, 3-tap convolution of a map nearest-upsampled by ``scales``.

    ``compressed``: each group of phases fills one position instead (its index in
    :func:`_phase_classes`), for a map that stores each distinct phase once (see
    :func:`_structured_kernels`)."""
    kernels = []
    indexed = (enumerate(_phase_classes(scale)) for scale in scales)
    for combo in itertools.product(*indexed):
        kernel = weight.detach()
        padding, crop, phases = [], [], []
        for axis, (position, (group, low, high)) in enumerate(combo):
            offsets = range(low, high + 1)
            taps = [[d + 1 for d in (-1, 0, 1) if (group[0] + d) // scales[axis] == o] for o in offsets]
            kernel = _sum_taps(kernel, axis + 2, taps)
            # Output i of a conv with k taps and padding p reads inputs i-p .. i-p+k-1; we need
            # i+low .. i+high, so p = 1 and a crop of 1 when the window starts at offset 0.
            padding.append(0 if len(taps) == 1 else 1)
            crop.append(1 if len(taps) == 2 and low == 0 else 0)
            if group != list(range(group[0], group[-1] + 1)):
                raise AssertionError(f"phases {group} of scale {scales[axis]} are not contiguous")
            phases.append(slice(position, position + 1) if compressed else slice(group[0], group[-1] + 1))
        kernel = kernel.contiguous(memory_format=_format_of(weight))
        kernels.append(_PhaseKernel(kernel, tuple(padding), tuple(crop), tuple(phases)))
    return kernels


_PhaseKernelCache = dict[tuple[tuple[int, ...], bool, torch.device, torch.dtype], list[_PhaseKernel]]


def _cached_phase_kernels(
    cache: _PhaseKernelCache, weight: torch.Tensor, scales: tuple[int, ...], compressed: bool = False
) -> list[_PhaseKernel]:
    """:func:`_phase_kernels`, remembered per scale, device and dtype (weights are frozen)."""
    key = (scales, compressed, weight.device, weight.dtype)
    if key not in cache:
        cache[key] = _phase_kernels(weight, scales, compressed)
    return cache[key]


def _sum_taps(weight: torch.Tensor, axis: int, groups: list[list[int]]) -> torch.Tensor:
    """``weight`` with the taps of each group (indices along ``axis``) summed into one tap."""
    parts = [
        weight.index_select(axis, torch.tensor(taps, device=weight.device)).sum(axis, keepdim=True)
        for taps in groups
    ]
    return torch.cat(parts, dim=axis)


def _structured_axis(scale: int) -> tuple[int, list[tuple[list[list[int]], int, int]]]:
    """One axis of a 3-tap convolution of a map made by a convolution of a nearest-``scale``-upsampled
    map: its phases repeat in the groups of :func:`_phase_classes` (at scale 4, phases 1 and 2 are
    equal), so the map is stored "compressed", one position per group. Returns the group count and,
    per output phase, the taps summed per compressed position read, the padding and the output
    offset for a convolution of the compressed map with stride = group count."""
    classes = _phase_classes(scale)
    count = len(classes)
    position = {phase: index for index, (group, _, _) in enumerate(classes) for phase in group}
    per_phase = []
    for phase in range(scale):
        taps: dict[int, list[int]] = {}
        for d in (-1, 0, 1):
            source = phase + d
            taps.setdefault((source // scale) * count + position[source % scale], []).append(d + 1)
        low, high = min(taps), max(taps)
        if sorted(taps) != list(range(low, high + 1)):
            raise AssertionError(f"phase {phase} of scale {scale} reads non-adjacent positions")
        # Output o of the strided conv reads positions count*o - padding ...; phase i needs
        # count*i + low ..., so o = i + shift with padding = count*shift - low >= 0.
        shift = max(0, -(-low // count))
        per_phase.append(([taps[offset] for offset in range(low, high + 1)], count * shift - low, shift))
    return count, per_phase


@dataclass(frozen=True)
class _StructuredKernel:
    """The convolution of a compressed map that gives one output phase ``phase`` (row, column)."""

    weight: torch.Tensor
    padding: tuple[int, int]
    crop: tuple[int, int]
    phase: tuple[int, int]


def _structured_kernels(weight: torch.Tensor, scale: int) -> tuple[int, list[_StructuredKernel]]:
    """A 3x3, padding-1 convolution of a phase-structured map (:func:`_structured_axis`) as one
    strided convolution of the compressed map per output phase: ``(group count, kernels)``."""
    count, axis = _structured_axis(scale)
    kernels = []
    for row, (row_taps, row_padding, row_shift) in enumerate(axis):
        rows = _sum_taps(weight.detach(), 2, row_taps)
        for col, (col_taps, col_padding, col_shift) in enumerate(axis):
            kernel = _sum_taps(rows, 3, col_taps).contiguous(memory_format=_format_of(weight))
            kernels.append(
                _StructuredKernel(kernel, (row_padding, col_padding), (row_shift, col_shift), (row, col))
            )
    return count, kernels


def _structured_conv(
    compressed: torch.Tensor, count: int, kernels: list[_StructuredKernel], bias: torch.Tensor | None
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """``(phase, result)`` per output phase of the convolution (see :func:`_structured_kernels`)."""
    _, _, height, width = compressed.shape
    height, width = height // count, width // count
    for kernel in kernels:
        result = F.conv2d(compressed, kernel.weight, bias, stride=count, padding=kernel.padding)
        row, col = kernel.crop
        yield kernel.phase, result[:, :, row : row + height, col : col + width]


def _upsampled_conv_into(
    small: torch.Tensor,
    kernels: list[_PhaseKernel],
    bias: torch.Tensor | None,
    scales: tuple[int, ...],
    outs: list[torch.Tensor],
    relu: bool = False,
) -> None:
    """Write ``conv(upsample(small))`` (then ReLU if ``relu``) into ``outs``, whose channel counts
    split the convolution's output channels in order (any strides; they may be views)."""
    batch, _, *sizes = small.shape
    conv = F.conv2d if small.dim() == 4 else F.conv3d
    split_sizes = [out.shape[1] for out in outs]
    phase_views = []
    for out in outs:
        interleaved = [dim for size, scale in zip(sizes, scales, strict=True) for dim in (size, scale)]
        phase_views.append(out.view(batch, out.shape[1], *interleaved))
    every = slice(None)
    # (B, C, n1, 1, n2, 1, ...): a phase result broadcast over the phases of its group.
    expanded_index = (every, every, *(index for _ in sizes for index in (every, None)))
    for kernel in kernels:
        result = conv(small, kernel.weight, bias, padding=kernel.padding)
        crop = (slice(start, start + size) for start, size in zip(kernel.crop, sizes, strict=True))
        result = result[(every, every, *crop)]
        if relu:
            result = F.relu_(result)
        target_index = (every, every, *(index for phase in kernel.phases for index in (every, phase)))
        for part, view in zip(result.split(split_sizes, dim=1), phase_views, strict=True):
            view[target_index] = part[expanded_index]


def upsampled_conv3x3(label: torch.Tensor, conv: nn.Conv2d, scale: int) -> torch.Tensor:
    """``conv(F.interpolate(label, scale_factor=scale, mode="nearest"))`` for a 3x3, padding-1 conv,
    computed at ``label``'s size (see the module docstring)."""
    batch, _, height, width = label.shape
    out = label.new_empty(batch, conv.out_channels, height * scale, width * scale)
    _upsampled_conv_into(label, _phase_kernels(conv.weight, (scale, scale)), conv.bias, (scale, scale), [out])
    return out


# --- the SPADE decoder ---------------------------------------------------------------------------------


def _instance_norm_affine(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per sample and channel with ``x * scale + shift == F.instance_norm(x)`` (as
    PyTorch's CPU kernel applies it); statistics in float32."""
    stats_input = x if x.dtype == torch.float32 else x.float()
    batch, channels = x.shape[:2]
    stats_shape = (batch, channels) + (1,) * (x.dim() - 2)
    if stats_input.is_contiguous():
        # BatchNorm's statistics over a (1, B*C, ...) view: what F.instance_norm computes, ~3x faster
        # than var_mean on CPU.
        mean, var = torch.batch_norm_update_stats(stats_input.view(1, batch * channels, -1), None, None, 0.0)
        mean, var = mean.view(stats_shape), var.view(stats_shape)
    else:
        var, mean = torch.var_mean(stats_input, dim=tuple(range(2, x.dim())), keepdim=True, correction=0)
    scale = torch.rsqrt(var + _INSTANCE_NORM_EPS)
    return scale, -mean * scale


def _phase_view(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``x`` (B, C, H*s, W*s) viewed as (B, C, H, s, W, s); ``x`` itself when ``scale`` is 1."""
    if scale == 1:
        return x
    batch, channels, height, width = x.shape
    return x.view(batch, channels, height // scale, scale, width // scale, scale)


def _broadcast_small(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``x`` (B, C, H, W) as (B, C, H, 1, W, 1): its nearest upsampling, by broadcasting."""
    return x if scale == 1 else x[:, :, :, None, :, None]


class _FusedSpadeBlock(nn.Module):
    """A :class:`SpadeResidualBlock` with its label MLPs fused, ``1 + gamma`` in the gamma bias and
    the learned shortcut composed with its beta convolution; the block's input may be handed over
    before a nearest upsampling (``upsample``), which is then never materialised."""

    def __init__(self, block: SpadeResidualBlock, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.memory_format = memory_format
        self.learned_shortcut = block.learned_shortcut
        norms: list[SpatiallyAdaptiveNorm] = [block.norm_0, block.norm_1]
        if self.learned_shortcut:
            norms.append(block.norm_s)
        shared = [norm.mlp_shared[0] for norm in norms]
        self.hidden_channels = shared[0].out_channels
        reference = shared[0].weight  # built where the generator lives (a CUDA GPU, its dtype)
        self.shared = nn.Conv2d(
            shared[0].in_channels,
            self.hidden_channels * len(norms),
            3,
            padding=1,
            device=reference.device,
            dtype=reference.dtype,
        )
        with torch.no_grad():
            self.shared.weight.copy_(torch.cat([conv.weight for conv in shared]))
            self.shared.bias.copy_(torch.cat([conv.bias for conv in shared]))
        self.gamma = nn.ModuleList()
        self.beta = nn.ModuleList()
        for norm in norms:
            gamma = copy.deepcopy(norm.mlp_gamma)
            with torch.no_grad():
                gamma.bias.add_(1.0)
            self.gamma.append(gamma)
            self.beta.append(norm.mlp_beta)
        self.conv_0, self.conv_1 = block.conv_0, block.conv_1
        self.conv_s = block.conv_s if self.learned_shortcut else None
        if self.conv_s is not None:
            self.beta[2] = self._compose(self.conv_s, norms[2].mlp_beta)
        _set_memory_format(self, memory_format)
        self._phase_cache: _PhaseKernelCache = {}
        self._structured_cache: dict[tuple, tuple[int, list[_StructuredKernel], torch.Tensor]] = {}

    @staticmethod
    def _compose(outer: nn.Conv2d, inner: nn.Conv2d) -> nn.Conv2d:
        """The 3x3 convolution ``outer(inner(x))`` for a 1x1 ``outer`` without bias (float64 sums)."""
        if outer.bias is not None or outer.kernel_size != (1, 1):
            raise ValueError("the SPADE shortcut is expected to be a 1x1 convolution without bias")
        matrix = outer.weight.detach().double()[:, :, 0, 0]
        composed = nn.Conv2d(
            inner.in_channels,
            outer.out_channels,
            3,
            padding=1,
            device=inner.weight.device,
            dtype=inner.weight.dtype,
        )
        with torch.no_grad():
            weight = torch.einsum("oc,chyx->ohyx", matrix, inner.weight.detach().double())
            composed.weight.copy_(weight.to(inner.weight.dtype))
            composed.bias.copy_((matrix @ inner.bias.detach().double()).to(inner.bias.dtype))
        return composed

    def _hidden(self, label_map: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """The ReLU'd hidden maps of the block's norms at ``size``, one tensor each."""
        count = len(self.gamma)
        if tuple(label_map.shape[2:]) == size:
            return list(F.relu_(self.shared(label_map)).split(self.hidden_channels, dim=1))
        scale = size[0] // label_map.shape[2]
        if scale > 1 and scale * label_map.shape[2] == size[0] and scale * label_map.shape[3] == size[1]:
            shape = (label_map.shape[0], self.hidden_channels, *size)
            hidden = [_empty_like_format(label_map, shape, self.memory_format) for _ in range(count)]
            _upsampled_conv_into(
                label_map,
                _cached_phase_kernels(self._phase_cache, self.shared.weight, (scale, scale)),
                self.shared.bias,
                (scale, scale),
                hidden,
                relu=True,
            )
            return hidden
        upsampled = F.interpolate(label_map, size=size, mode="nearest")
        return list(F.relu_(self.shared(upsampled)).split(self.hidden_channels, dim=1))

    def _modulate(
        self, normalized: torch.Tensor, hidden: torch.Tensor, index: int, scale: int
    ) -> torch.Tensor:
        """``normalized * (1 + gamma) + beta`` written into the beta convolution's output."""
        beta = self.beta[index](hidden)
        gamma = self.gamma[index](hidden)
        _phase_view(beta, scale).addcmul_(_broadcast_small(normalized, scale), _phase_view(gamma, scale))
        return beta

    def _structured(self, index: int, scale: int) -> tuple[int, list[_StructuredKernel], torch.Tensor]:
        """Norm ``index``'s gamma and beta convolutions, fused, as :func:`_structured_kernels`."""
        gamma, beta = self.gamma[index], self.beta[index]
        key = (index, scale, gamma.weight.device, gamma.weight.dtype)
        if key not in self._structured_cache:
            weight = torch.cat([gamma.weight, beta.weight]).contiguous(memory_format=self.memory_format)
            count, kernels = _structured_kernels(weight, scale)
            self._structured_cache[key] = (count, kernels, torch.cat([gamma.bias, beta.bias]))
        return self._structured_cache[key]

    def _label_scale(self, label_map: torch.Tensor, size: tuple[int, int]) -> int:
        """The integer factor from the label map's size to ``size`` (0 when there is none)."""
        scale = size[0] // label_map.shape[2]
        fits = scale * label_map.shape[2] == size[0] and scale * label_map.shape[3] == size[1]
        return scale if fits else 0

    def _forward_structured(
        self, x: torch.Tensor, label_map: torch.Tensor, upsample: int, scale: int
    ) -> torch.Tensor:
        """The block where the label map is upsampled by ``scale`` with repeating phases
        (:func:`_structured_axis`): the hidden maps are kept compressed and every gamma/beta
        convolution is done per output phase, straight into the modulated map."""
        batch, _, height, width = label_map.shape
        count = len(_phase_classes(scale))
        size = (height * scale, width * scale)
        shape = (batch, self.hidden_channels, height * count, width * count)
        compressed = [_empty_like_format(label_map, shape, self.memory_format) for _ in self.gamma]
        kernels = _cached_phase_kernels(self._phase_cache, self.shared.weight, (scale, scale), True)
        _upsampled_conv_into(label_map, kernels, self.shared.bias, (count, count), compressed, relu=True)

        def phases(index: int) -> Iterator[tuple[tuple[int, int], torch.Tensor, torch.Tensor]]:
            count_, kernels, bias = self._structured(index, scale)
            channels = self.gamma[index].out_channels
            for phase, result in _structured_conv(compressed[index], count_, kernels, bias):
                gamma, beta = result.split([channels, result.shape[1] - channels], dim=1)
                yield phase, gamma, beta

        def empty(channels: int) -> torch.Tensor:
            return _empty_like_format(x, (batch, channels, *size), self.memory_format)

        scale_x, shift_x = _instance_norm_affine(x)
        normalized = torch.addcmul(shift_x, x, scale_x)
        period = scale // upsample

        def normalized_phase(row: int, col: int) -> torch.Tensor:
            return normalized[:, :, row // upsample :: period, col // upsample :: period]

        if self.conv_s is not None:
            shortcut = empty(self.conv_s.out_channels)
            shortcut_phases = _phase_view(shortcut, scale)
            for (row, col), gamma, beta in phases(2):
                product = gamma * normalized_phase(row, col)
                torch.add(self.conv_s(product), beta, out=shortcut_phases[:, :, :, row, :, col])
        else:
            shortcut = F.interpolate(x, scale_factor=upsample, mode="nearest")
        out = empty(x.shape[1])
        out_phases = _phase_view(out, scale)
        for (row, col), gamma, beta in phases(0):
            torch.addcmul(beta, normalized_phase(row, col), gamma, out=out_phases[:, :, :, row, :, col])
        out = self.conv_0(F.leaky_relu_(out, SPADE_LEAKY_SLOPE))
        scale_out, shift_out = _instance_norm_affine(out)
        out = torch.addcmul(shift_out, out, scale_out, out=out)
        out_phases = _phase_view(out, scale)
        for (row, col), gamma, beta in phases(1):
            target = out_phases[:, :, :, row, :, col]
            torch.addcmul(beta, target, gamma, out=target)
        out = self.conv_1(F.leaky_relu_(out, SPADE_LEAKY_SLOPE))
        return out.add_(shortcut)

    def forward(self, x: torch.Tensor, label_map: torch.Tensor, upsample: int = 1) -> torch.Tensor:
        """The block applied to ``F.interpolate(x, scale_factor=upsample, mode="nearest")``."""
        x = x.contiguous(memory_format=self.memory_format)
        label_map = label_map.contiguous(memory_format=self.memory_format)
        size = (x.shape[2] * upsample, x.shape[3] * upsample)
        scale = self._label_scale(label_map, size)
        if (
            _STRUCTURED_SPADE
            and scale > 1
            and len(_phase_classes(scale)) < scale
            and scale % upsample == 0
            and x.dtype == label_map.dtype
        ):
            return self._forward_structured(x, label_map, upsample, scale)
        hidden = self._hidden(label_map, size)
        # Upsampling repeats values, so the statistics, and the normalised map, are the small map's.
        scale, shift = _instance_norm_affine(x)
        normalized = torch.addcmul(shift, x, scale)
        if self.conv_s is not None:
            gamma = self.gamma[2](hidden[2])
            _phase_view(gamma, upsample).mul_(_broadcast_small(normalized, upsample))
            shortcut = self.conv_s(gamma).add_(self.beta[2](hidden[2]))
        elif upsample != 1:
            shortcut = F.interpolate(x, scale_factor=upsample, mode="nearest")
        else:
            shortcut = x
        out = self._modulate(normalized, hidden[0], 0, upsample)
        out = self.conv_0(F.leaky_relu_(out, SPADE_LEAKY_SLOPE))
        scale, shift = _instance_norm_affine(out)
        out = torch.addcmul(shift, out, scale, out=out) if out.dtype == shift.dtype else out * scale + shift
        out = self.conv_1(F.leaky_relu_(self._modulate(out, hidden[1], 1, 1), SPADE_LEAKY_SLOPE))
        return out.add_(shortcut)


# Memory formats of the decoder's stages. oneDNN's channels-last (BRGEMM) convolutions are faster but
# sum in another order, ~5x less accurately; in the middle blocks, whose activations grow large, that
# would show in the frames (about 2.5x the reference's own float32 error on random weights), so they
# stay in the plain format, where oneDNN uses the reference's kernels. The up-sampling blocks, at 4x
# and 16x the pixels, gain the most and add no measurable error.
_DECODER_FORMATS: dict[str, torch.memory_format] = {
    "middle": torch.contiguous_format,
    "up_0": torch.channels_last,
    "up_1": torch.channels_last,
}


class _FastDecoder(nn.Module):
    """:class:`SpadeImageDecoder` over fused blocks; its upsamplings are folded into the up blocks."""

    def __init__(self, decoder: SpadeImageDecoder) -> None:
        super().__init__()
        self.fc = decoder.fc
        formats = _DECODER_FORMATS
        self.middle = nn.ModuleList(
            _FusedSpadeBlock(getattr(decoder, f"G_middle_{i}"), formats["middle"]) for i in range(6)
        )
        self.up_0 = _FusedSpadeBlock(decoder.up_0, formats["up_0"])
        self.up_1 = _FusedSpadeBlock(decoder.up_1, formats["up_1"])
        self.conv_img = decoder.conv_img
        _set_memory_format(self.conv_img, formats["up_1"])
        _set_memory_format(self.fc, formats["middle"])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.fc(features)
        for block in self.middle:
            out = block(out, features)
        out = self.up_0(out, features, upsample=2)
        out = self.up_1(out, features, upsample=2)
        return torch.sigmoid_(self.conv_img(F.leaky_relu_(out, SPADE_LEAKY_SLOPE)))


# --- the dense motion estimator ------------------------------------------------------------------------


def _pool_height_width(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool3d(x, (1, 2, 2))`` of a channels-last 3-D map, as a 2-D pool (same sums)."""
    batch, channels, depth, height, width = x.shape
    flat = x.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, height, width)
    pooled = F.avg_pool2d(flat, 2)
    return pooled.view(batch, depth, channels, height // 2, width // 2).permute(0, 2, 1, 3, 4)


def _separable_gaussians(
    keypoints: torch.Tensor, spatial_size: tuple[int, int, int], variance: float
) -> torch.Tensor:
    """``keypoint_gaussians`` as a product of three 1-D Gaussians: ``(bs, K, d, h, w)``."""
    depth, height, width = spatial_size
    factors = []
    for axis, size in zip((2, 1, 0), (depth, height, width), strict=True):
        positions = normalized_axis(size, device=keypoints.device, dtype=keypoints.dtype)
        factors.append(torch.exp(-0.5 * (positions - keypoints[..., axis : axis + 1]).pow(2) / variance))
    along_depth, along_height, along_width = factors
    plane = along_height[:, :, :, None] * along_width[:, :, None, :]
    return along_depth[:, :, :, None, None] * plane[:, :, None]


class _FastMotion(nn.Module):
    """:class:`DenseMotionEstimator` (BatchNorm folded) in channels-last 3-D with the upsampling
    blocks' convolutions computed at the small size and the skips concatenated in place."""

    def __init__(self, motion: DenseMotionEstimator) -> None:
        super().__init__()
        self.num_kp = motion.num_kp
        self.compress = motion.compress
        hourglass: Hourglass3d = motion.hourglass
        self.down = nn.ModuleList(block.conv for block in hourglass.encoder.down_blocks)
        self.up = nn.ModuleList(block.conv for block in hourglass.decoder.up_blocks)
        self._phase_caches: list[_PhaseKernelCache] = [{} for _ in self.up]
        self.out_conv = hourglass.decoder.conv
        self.mask = motion.mask
        self.occlusion = motion.occlusion
        for conv in (*self.down, *self.up, self.out_conv):
            _set_memory_format(conv, torch.channels_last_3d)

    def _hourglass(self, x: torch.Tensor) -> torch.Tensor:
        levels = [x]
        for conv in self.down:
            levels.append(_pool_height_width(F.relu_(conv(levels[-1]))))
        out = levels.pop()
        for conv, cache in zip(self.up, self._phase_caches, strict=True):
            skip = levels.pop()
            batch, skip_channels, depth, height, width = skip.shape
            channels = conv.out_channels
            joined = torch.empty(
                batch, depth, height, width, channels + skip_channels, device=x.device, dtype=x.dtype
            ).permute(0, 4, 1, 2, 3)
            kernels = _cached_phase_kernels(cache, conv.weight, (1, 2, 2))
            _upsampled_conv_into(out, kernels, conv.bias, (1, 2, 2), [joined[:, :channels]], relu=True)
            joined[:, channels:] = skip
            out = joined
        return F.relu_(self.out_conv(out))

    def forward(
        self, feature: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch, _, depth, height, width = feature.shape
        count = self.num_kp + 1
        # The renderer hands the batch one source, expanded: its source-only work is done once.
        shared = batch == 1 or (feature.stride(0) == 0 and source_kp.stride(0) == 0)
        sources = 1 if shared else batch
        compressed = F.relu_(self.compress(feature[:sources]))

        identity = coordinate_grid_3d(depth, height, width, device=feature.device, dtype=feature.dtype)
        shift = source_kp - driving_kp  # (bs, K, 3)
        flows = identity.view(1, 1, depth, height, width, 3) + shift.view(batch, self.num_kp, 1, 1, 1, 3)
        sample = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}
        per_keypoint = compressed.unsqueeze(1).expand(sources, self.num_kp, *compressed.shape[1:])
        per_keypoint = per_keypoint.expand(batch, *per_keypoint.shape[1:]) if shared else per_keypoint
        warped = F.grid_sample(
            per_keypoint.reshape(batch * self.num_kp, -1, depth, height, width),
            flows.view(batch * self.num_kp, depth, height, width, 3),
            **sample,
        ).view(batch, self.num_kp, -1, depth, height, width)
        background = F.grid_sample(
            compressed, identity.unsqueeze(0).expand(sources, depth, height, width, 3), **sample
        )

        spatial = (depth, height, width)
        source_heat = _separable_gaussians(source_kp[:sources], spatial, KEYPOINT_VARIANCE)
        heat = _separable_gaussians(driving_kp, spatial, KEYPOINT_VARIANCE).sub_(source_heat)

        # The hourglass input, channels (keypoint, [heat, 4 warped features]), channels-last.
        channels = compressed.shape[1] + 1
        packed = feature.new_empty(batch, depth, height, width, count, channels)
        packed[..., 0, 0] = 0
        packed[..., 0, 1:] = background.permute(0, 2, 3, 4, 1)
        packed[..., 1:, 0] = heat.permute(0, 2, 3, 4, 1)
        packed[..., 1:, 1:] = warped.permute(0, 3, 4, 5, 1, 2)
        hourglass_in = packed.view(batch, depth, height, width, count * channels).permute(0, 4, 1, 2, 3)

        prediction = self._hourglass(hourglass_in).contiguous()
        mask = F.softmax(self.mask(prediction), dim=1)
        weights = mask.masked_fill(mask < MASK_FLOOR, 0.0)
        # sum_k w_k * (identity + shift_k), with shift_0 = 0.
        moved = torch.einsum("bkdhw,bkc->bdhwc", weights[:, 1:], shift)
        deformation = moved.addcmul_(identity, weights.sum(dim=1).unsqueeze(-1))

        occlusion = torch.sigmoid_(self.occlusion(prediction.view(batch, -1, height, width)))
        return {"mask": mask, "deformation": deformation, "occlusion_map": occlusion}


# --- the generator -------------------------------------------------------------------------------------


class _Render2d(nn.Module):
    """The generator's stages after the warp: ``third``, ``fourth``, the occlusion, the decoder."""

    def __init__(self, generator: WarpingSpadeGenerator) -> None:
        super().__init__()
        self.third = generator.third.conv
        self.fourth = generator.fourth
        self.decoder = _FastDecoder(generator.decoder)

    def forward(self, warped: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
        batch, channels, depth, height, width = warped.shape
        flat = warped.reshape(batch, channels * depth, height, width)
        out = F.leaky_relu_(self.third(flat), _THIRD_LEAKY_SLOPE)
        out = self.fourth(out)
        if occlusion.shape[2:] != out.shape[2:]:
            occlusion = F.interpolate(occlusion, size=out.shape[2:], mode="bilinear", align_corners=False)
        return self.decoder(out.mul_(occlusion))


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
        self.motion = _FastMotion(motion).requires_grad_(False)
        self.render_2d = _Render2d(fused).requires_grad_(False)
        # `generator` keeps what encode_source needs; its rendering stages live on, fused, in `motion`
        # and `render_2d` (the SPADE MLPs those replaced are dropped: ~15M parameters).
        for name in ("dense_motion_network", "third", "fourth", "decoder"):
            delattr(fused, name)
        self.generator = fused.requires_grad_(False)
        self.precision = precision

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        return self.generator.encode_source(source_image)

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        motion = self.motion(source_volume, driving_kp, source_kp)
        warped = warp_volume(source_volume, motion["deformation"])
        if self.precision == "bf16":
            # The motion field, the warp and the occlusion stay float32: sampling grids need the
            # precision. The 2-D stages after the warp (most of the cost) run in bfloat16.
            with torch.autocast(warped.device.type, dtype=torch.bfloat16):
                prediction = self.render_2d(warped, motion["occlusion_map"]).float()
        else:
            prediction = self.render_2d(warped, motion["occlusion_map"])
        return {"prediction": prediction, "mask": motion["mask"], "occlusion_map": motion["occlusion_map"]}


def optimize_generator(
    generator: WarpingSpadeGenerator, precision: RenderPrecision = "fp32"
) -> FastFaceGenerator:
    """A :class:`FastFaceGenerator` for ``generator`` (which must be in eval mode; it is not changed)."""
    if generator.training:
        raise ValueError("optimize_generator needs the generator in eval mode (BatchNorm running statistics)")
    return FastFaceGenerator(generator, precision)
