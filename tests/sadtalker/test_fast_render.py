"""The fused face generator (sadtalker/fast_render.py) computes the reference generator's frames."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sadtalker import fast_render
from sadtalker.fast_render import optimize_generator, upsampled_conv3x3
from sadtalker.networks.blocks import SpadeResidualBlock, keypoint_gaussians
from sadtalker.networks.generator import WarpingSpadeGenerator


@pytest.fixture(scope="module")
def generator() -> WarpingSpadeGenerator:
    """Random weights with non-trivial BatchNorm statistics, so folding them is really tested."""
    torch.manual_seed(0)
    model = WarpingSpadeGenerator()
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    source_kp = torch.rand(1, 15, 3) * 2 - 1
    return torch.rand(1, 3, 128, 128), source_kp + 0.05 * torch.randn(1, 15, 3), source_kp


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_upsampled_conv_equals_conv_of_the_upsampled_map(scale: int) -> None:
    torch.manual_seed(scale)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    label = torch.randn(2, 5, 6, 9)
    expected = conv(F.interpolate(label, scale_factor=scale, mode="nearest"))
    with torch.no_grad():
        torch.testing.assert_close(upsampled_conv3x3(label, conv, scale), expected, atol=1e-5, rtol=1e-5)


def test_fused_generator_equals_the_reference_to_float32_rounding(generator: WarpingSpadeGenerator) -> None:
    image, driving, source = inputs()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    fast = optimize_generator(generator)
    with torch.no_grad():
        expected = generator(image, driving, source)
        ours = fast.render(fast.encode_source(image), driving, source)
        exact = copy.deepcopy(generator).double()(image.double(), driving.double(), source.double())
    for key in ("mask", "occlusion_map"):
        torch.testing.assert_close(ours[key], expected[key], atol=1e-4, rtol=1e-4)
    # The frame: with random weights the decoder's activations reach ~1e4, so float32 itself is only
    # good to ~1.5e-4 here (the reference's own largest error against a float64 evaluation), and any
    # other order of the same sums moves single pixels by about that much. Ours must be as close to
    # the float64 frame as the reference is, and within about that of the reference.
    reference_error = (expected["prediction"].double() - exact["prediction"]).abs().max().item()
    our_error = (ours["prediction"].double() - exact["prediction"]).abs().max().item()
    assert our_error <= 1.5 * reference_error, (our_error, reference_error)
    torch.testing.assert_close(ours["prediction"], expected["prediction"], atol=3e-4, rtol=1e-4)
    assert (ours["prediction"] - expected["prediction"]).abs().mean() < 1e-5
    after = generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the loaded generator is not changed"


def test_a_batch_sharing_one_source_equals_the_reference(generator: WarpingSpadeGenerator) -> None:
    """The renderer passes the source volume and keypoints expanded; the source-only work is shared."""
    image, driving, source = inputs()
    driving = torch.cat(
        [driving, source + 0.05 * torch.randn(1, 15, 3, generator=torch.Generator().manual_seed(2))]
    )
    fast = optimize_generator(generator)
    with torch.no_grad():
        expected = generator(image.expand(2, -1, -1, -1), driving, source.expand(2, -1, -1))
        volume = fast.encode_source(image)
        ours = fast.render(volume.expand(2, *volume.shape[1:]), driving, source.expand(2, -1, -1))
        unshared = fast.render(volume.repeat(2, 1, 1, 1, 1), driving, source.repeat(2, 1, 1))
    for key in ("mask", "occlusion_map"):
        torch.testing.assert_close(ours[key], expected[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["prediction"], expected["prediction"], atol=3e-4, rtol=1e-4)
    for key in ("mask", "occlusion_map"):
        torch.testing.assert_close(ours[key], unshared[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours["prediction"], unshared["prediction"], atol=3e-4, rtol=1e-4)


def test_upsampled_3d_conv_into_a_concatenation_view() -> None:
    """The hourglass's up blocks: conv3d(upsample (1, 2, 2)) + ReLU written into part of a buffer."""
    torch.manual_seed(4)
    conv = torch.nn.Conv3d(6, 5, 3, padding=1)
    small = torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = F.relu(conv(F.interpolate(small, scale_factor=(1.0, 2.0, 2.0), mode="nearest")))
        joined = torch.full((2, 3, 8, 10, 7), float("nan")).permute(0, 4, 1, 2, 3)
        kernels = fast_render._phase_kernels(conv.weight, (1, 2, 2))
        fast_render._upsampled_conv_into(small, kernels, conv.bias, (1, 2, 2), [joined[:, :5]], relu=True)
    torch.testing.assert_close(joined[:, :5], expected, atol=1e-5, rtol=1e-5)
    assert joined[:, 5:].isnan().all(), "only the given channels are written"


@pytest.mark.parametrize("scale", [4, 8])
def test_structured_conv_equals_the_conv_of_the_full_map(scale: int) -> None:
    """A conv of conv(upsampled label) (phases repeat) from the compressed map, phase by phase."""
    torch.manual_seed(7)
    label_conv, conv = torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Conv2d(5, 6, 3, padding=1)
    label = torch.randn(2, 3, 4, 5)
    with torch.no_grad():
        expected = conv(label_conv(F.interpolate(label, scale_factor=scale, mode="nearest")))
        count, kernels = fast_render._structured_kernels(conv.weight, scale)
        assert count == 3 < scale
        compressed = torch.empty(2, 5, 4 * count, 5 * count)
        label_kernels = fast_render._phase_kernels(label_conv.weight, (scale, scale), compressed=True)
        fast_render._upsampled_conv_into(label, label_kernels, label_conv.bias, (count, count), [compressed])
        ours = torch.full_like(expected, float("nan"))
        phases = ours.view(2, 6, 4, scale, 5, scale)
        for (row, col), result in fast_render._structured_conv(compressed, count, kernels, conv.bias):
            phases[:, :, :, row, :, col] = result
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("channels", "upsample"), [((16, 16), 1), ((16, 8), 2)])
def test_fused_spade_block_equals_the_block_on_its_upsampled_input(
    memory_format: torch.memory_format,
    channels: tuple[int, int],
    upsample: int,
    structured: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Label 2x3 under a 4x6 input: 2x (phases), or 4x (compressed phases) with ``upsample=2``."""
    monkeypatch.setattr(fast_render, "_STRUCTURED_SPADE", structured)
    torch.manual_seed(5)
    block = SpadeResidualBlock(*channels, label_channels=6).eval()
    materialised = copy.deepcopy(block)
    fast_render._materialise_spectral_norm(materialised)
    fused = fast_render._FusedSpadeBlock(materialised, memory_format)
    x, label = torch.randn(2, channels[0], 4, 6), torch.randn(2, 6, 2, 3)
    with torch.no_grad():
        expected = block(F.interpolate(x, scale_factor=upsample, mode="nearest"), label)
        ours = fused(x, label, upsample=upsample)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_motion_helpers_equal_what_they_replace() -> None:
    torch.manual_seed(6)
    keypoints = torch.rand(2, 15, 3) * 2 - 1
    torch.testing.assert_close(
        fast_render._separable_gaussians(keypoints, (4, 6, 8), 0.01),
        keypoint_gaussians(keypoints, (4, 6, 8), 0.01),
        atol=1e-6,
        rtol=1e-5,
    )
    volume = torch.randn(2, 5, 3, 8, 6).contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(fast_render._pool_height_width(volume), F.avg_pool3d(volume, (1, 2, 2)))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = (torch.randn(2, 7, 9, 5) * 3 + 2).contiguous(memory_format=layout)
        scale, shift = fast_render._instance_norm_affine(x)
        torch.testing.assert_close(x * scale + shift, F.instance_norm(x, eps=1e-5), atol=1e-5, rtol=1e-5)


def test_bf16_fast_mode_is_close_but_not_equal(generator: WarpingSpadeGenerator) -> None:
    image, driving, source = inputs()
    fast = optimize_generator(generator, "bf16")
    with torch.no_grad():
        expected = generator(image, driving, source)["prediction"]
        ours = fast.render(fast.encode_source(image), driving, source)["prediction"]
    assert ours.dtype == torch.float32
    assert not torch.equal(ours, expected)
    assert (ours - expected).abs().mean() < 0.05


def test_training_mode_generator_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        optimize_generator(WarpingSpadeGenerator().train())


def test_fused_weights_stay_on_the_generators_device_and_dtype(generator: WarpingSpadeGenerator) -> None:
    """Every fused tensor is built where the generator lives: a layer created with defaults would sit
    on the CPU in float32 while the generator is on a CUDA GPU (the first SPADE block then fails on
    mixed devices). float64 stands in for "not the default" here."""
    fast = optimize_generator(copy.deepcopy(generator).double())
    tensors = dict(fast.named_parameters()) | dict(fast.named_buffers())
    strays = {
        name: (t.device, t.dtype)
        for name, t in tensors.items()
        if t.is_floating_point() and t.dtype != torch.float64
    }
    assert not strays
