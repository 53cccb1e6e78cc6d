"""Audio -> coefficients: blinks, smoothing, reference videos, render-time edits, head-angle paths."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sadtalker.coefficients import (
    BLINK_PROFILE,
    apply_reference_pose,
    blink_ratio,
    camera_angles,
    coefficient_windows,
    driving_coefficients,
    predict_coefficients,
    smooth_pose,
    tile_to_length,
)
from sadtalker.errors import SadTalkerError
from sadtalker.networks.factory import build_sub_model


@pytest.fixture(scope="module")
def audio_models() -> SimpleNamespace:
    torch.manual_seed(0)
    return SimpleNamespace(
        audio2exp=build_sub_model("audio2exp").eval(), audio2pose=build_sub_model("audio2pose").eval()
    )


@pytest.fixture(scope="module")
def mels() -> np.ndarray:
    return np.random.default_rng(0).uniform(-4, 4, size=(40, 80, 16)).astype(np.float32)


def test_random_blinks_follow_the_reference_rules() -> None:
    assert not blink_ratio(20, np.random.default_rng(0)).any()  # no blinks up to 20 frames
    assert not blink_ratio(21, np.random.default_rng(0)).any()  # empty gap range: no blink, no crash
    for seed in range(20):
        ratio = blink_ratio(300, np.random.default_rng(seed))[:, 0]
        assert ratio.shape == (300,)
        starts = [i for i in range(300) if ratio[i] == 0.5 and (i == 0 or ratio[i - 1] == 0)]
        assert starts, seed
        previous_end = 0
        for start in starts:
            np.testing.assert_allclose(ratio[start : start + 5], BLINK_PROFILE, rtol=1e-6)
            assert 10 <= start - previous_end < 70  # the gap after the previous blink
            previous_end = start + 5
        assert previous_end <= 299  # a blink never touches the last frame
    np.testing.assert_array_equal(
        blink_ratio(100, np.random.default_rng(3)), blink_ratio(100, np.random.default_rng(3))
    )


def test_pose_smoothing() -> None:
    t = np.arange(30, dtype=np.float64)[:, None]
    quadratic = np.repeat(0.01 * t**2 - 0.2 * t + 1, 6, axis=1).astype(np.float32)
    np.testing.assert_allclose(smooth_pose(quadratic), quadratic, atol=1e-4)  # order 2 keeps quadratics
    noisy = quadratic + np.random.default_rng(0).normal(0, 0.1, quadratic.shape).astype(np.float32)
    assert np.abs(smooth_pose(noisy) - quadratic).mean() < np.abs(noisy - quadratic).mean()
    for frames in (1, 2):  # no quadratic fits: returned as is
        np.testing.assert_array_equal(smooth_pose(noisy[:frames]), noisy[:frames])
    assert smooth_pose(noisy[:8]).shape == (8, 6)  # window 7 for an 8-frame clip


def test_reference_pose_and_tiling() -> None:
    reference = np.zeros((4, 73), dtype=np.float32)
    reference[:, 64] = [10, 11, 12, 13]
    np.testing.assert_array_equal(tile_to_length(reference[:, 64], 10), [10, 11, 12, 13] * 2 + [10, 11])
    predicted = np.ones((10, 70), dtype=np.float32)
    moved = apply_reference_pose(predicted, reference)
    np.testing.assert_array_equal(moved[:, 64], 1 + np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1]))
    np.testing.assert_array_equal(moved[:, :64], predicted[:, :64])
    with pytest.raises(SadTalkerError):
        tile_to_length(reference[:0], 3)


def test_driving_coefficients_scale_still_and_full_modes() -> None:
    predicted = np.random.default_rng(0).normal(size=(5, 70)).astype(np.float32)
    source = np.arange(73, dtype=np.float32)
    crop = driving_coefficients(predicted, source, full_mode=False, expression_scale=2.0)
    assert crop.source.shape == (70,) and crop.frames.shape == (5, 70)
    np.testing.assert_allclose(crop.frames[:, :64], 2 * predicted[:, :64])
    np.testing.assert_array_equal(crop.frames[:, 64:], predicted[:, 64:])
    full = driving_coefficients(predicted, source, full_mode=True, still=True)
    assert full.frames.shape == (5, 73)
    np.testing.assert_array_equal(full.frames[:, 64:], np.repeat(source[None, 64:], 5, axis=0))
    np.testing.assert_array_equal(full.frames[:, :64], predicted[:, :64])


def test_coefficient_windows_clamp_at_the_clip_ends() -> None:
    frames = np.repeat(np.arange(5, dtype=np.float32)[:, None], 70, axis=1)
    windows = coefficient_windows(frames, 0, 5)
    assert windows.shape == (5, 70, 27)
    assert windows[0, 0].tolist() == [0] * 14 + [1, 2, 3, 4] + [4] * 9
    np.testing.assert_array_equal(coefficient_windows(frames, 3, 5), windows[3:5])


def test_camera_angle_paths() -> None:
    np.testing.assert_array_equal(camera_angles([7], 4), [7, 7, 7, 7])
    path = camera_angles([0, 20, -10], 11)  # 50 degrees of travel over 10 steps: 5 per frame
    np.testing.assert_allclose(path, [0, 5, 10, 15, 20, 15, 10, 5, 0, -5, -5])
    assert camera_angles([5, 5, 5], 3).tolist() == [5, 5, 5]  # no travel (the reference divided by 0)
    assert camera_angles([0, 10], 1).tolist() == [0]


def test_predicted_coefficients_are_seeded(audio_models: SimpleNamespace, mels: np.ndarray) -> None:
    source = np.random.default_rng(1).normal(0, 0.1, size=73).astype(np.float32)

    def predict(seed: int, **kwargs: object) -> np.ndarray:
        return predict_coefficients(
            audio_models, mels, source, pose_style=3, seed=seed, device="cpu", **kwargs
        )

    first = predict(5)
    assert first.shape == (40, 70) and first.dtype == np.float32
    np.testing.assert_array_equal(first, predict(5))
    other = predict(6)
    assert not np.array_equal(first[:, 64:], other[:, 64:])  # new latents: another head motion
    assert not np.array_equal(first[:, :64], other[:, :64])  # new blink timing (40 frames > 20)

    video = np.random.default_rng(2).normal(0, 0.2, size=(7, 73)).astype(np.float32)
    with_pose = predict(5, ref_pose=video)
    expected_shift = tile_to_length(video[:, 64:70], 40) - video[0, 64:70]
    np.testing.assert_allclose(with_pose[:, 64:] - first[:, 64:], expected_shift, atol=1e-5)
    with_blinks = predict(5, ref_eyeblink=video)
    assert not np.allclose(with_blinks[:, :64], first[:, :64])
    with pytest.raises(SadTalkerError, match="between 0 and 45"):
        predict_coefficients(audio_models, mels, source, pose_style=46, seed=0, device="cpu")
