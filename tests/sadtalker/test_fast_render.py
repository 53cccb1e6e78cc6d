"""The fused face generator (sadtalker/fast_render.py) computes the reference generator's frames."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sadtalker.fast_render import optimize_generator, upsampled_conv3x3
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
    for key in ("prediction", "mask", "occlusion_map"):
        torch.testing.assert_close(ours[key], expected[key], atol=1e-4, rtol=1e-4)
    after = generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the loaded generator is not changed"


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
