"""The renderer streams: batches go to the sink as they are made, ranges join up, memory stays flat."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from sadtalker.coefficients import DrivingCoefficients
from sadtalker.networks.mapping import MappingNet
from sadtalker.render import FrameRenderer, HeadAngles
from tests.sadtalker.helpers import CheapGenerator

SIZE = 32


class FixedKeypoints:
    """Stands in for the keypoint detector: the same 15 canonical keypoints for any image."""

    def __init__(self) -> None:
        self.keypoints = torch.linspace(-0.5, 0.5, 45).view(1, 15, 3)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.keypoints.expand(image.shape[0], -1, -1)


def make_renderer(frame_count: int, angles: HeadAngles | None = None) -> FrameRenderer:
    torch.manual_seed(0)
    mapping = MappingNet(coeff_count=70, descriptor_channels=32).eval()
    rng = np.random.default_rng(0)
    coefficients = DrivingCoefficients(
        source=rng.normal(size=70).astype(np.float32),
        frames=rng.normal(size=(frame_count, 70)).astype(np.float32),
    )
    image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    return FrameRenderer(
        kp_extractor=FixedKeypoints(),  # type: ignore[arg-type]
        generator=CheapGenerator(),
        mapping=mapping,
        source_image=image,
        coefficients=coefficients,
        device="cpu",
        angles=angles,
    )


class CollectingSink:
    def __init__(self) -> None:
        self.batches: list[tuple[int, np.ndarray]] = []

    def __call__(self, frames: np.ndarray, first: int) -> None:
        self.batches.append((first, frames.copy()))

    def frames(self) -> np.ndarray:
        return np.concatenate([frames for _, frames in self.batches])


def test_batches_arrive_in_order_and_ranges_join_up() -> None:
    renderer = make_renderer(23)
    whole = CollectingSink()
    assert renderer.render(whole, batch_size=4) == 23
    assert [first for first, _ in whole.batches] == [0, 4, 8, 12, 16, 20]
    assert [len(frames) for _, frames in whole.batches] == [4, 4, 4, 4, 4, 3]
    frames = whole.frames()
    assert frames.shape == (23, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert len({frame.tobytes() for frame in frames}) > 1  # frames follow the coefficients

    head, tail = CollectingSink(), CollectingSink()
    renderer.render(head, 0, 10, batch_size=3)
    renderer.render(tail, 10, 23, batch_size=5)
    np.testing.assert_array_equal(np.concatenate([head.frames(), tail.frames()]), frames)


def test_head_angle_paths_replace_the_predicted_angles() -> None:
    plain, turned = CollectingSink(), CollectingSink()
    make_renderer(6).render(plain, batch_size=6)
    yaw = np.linspace(-30, 30, 6).astype(np.float32)
    make_renderer(6, HeadAngles(yaw=yaw)).render(turned, batch_size=6)
    assert not np.array_equal(plain.frames(), turned.frames())
    with pytest.raises(ValueError, match="yaw path has 5 values for 6 frames"):
        make_renderer(6, HeadAngles(yaw=yaw[:5]))


def test_invalid_ranges() -> None:
    renderer = make_renderer(5)
    with pytest.raises(ValueError, match="outside the clip"):
        renderer.render(CollectingSink(), 3, 6)
    with pytest.raises(ValueError, match="batch_size"):
        renderer.render(CollectingSink(), batch_size=0)


def test_nothing_accumulates_while_streaming() -> None:
    delivered: list[weakref.ref[np.ndarray]] = []
    previous_alive: list[bool] = []

    def counting_sink(frames: np.ndarray, first: int) -> None:
        if delivered:
            previous_alive.append(delivered[-1]() is not None)
        delivered.append(weakref.ref(frames))

    def peak_bytes(frame_count: int) -> tuple[int, int]:
        renderer = make_renderer(frame_count)
        delivered.clear()
        gc.collect()
        tracemalloc.start()
        try:
            rendered = renderer.render(counting_sink, batch_size=4)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return rendered, peak

    short_count, short_peak = peak_bytes(24)
    long_count, long_peak = peak_bytes(240)
    assert (short_count, long_count) == (24, 240)
    assert len(delivered) == 60
    # Each batch was released by the renderer before the next one was made.
    assert previous_alive and not any(previous_alive)
    # 10x the frames, about the same peak of Python-side memory (coefficient windows, batches).
    assert long_peak < short_peak * 1.5 + 256 * 1024


class MemoryCappedGenerator(CheapGenerator):
    """Runs out of memory (as CUDA would) on batches larger than ``fits``."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.batches: list[int] = []

    def render(self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor):
        self.batches.append(driving_kp.shape[0])
        if driving_kp.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return super().render(source_volume, driving_kp, source_kp)


def test_a_batch_that_runs_out_of_gpu_memory_is_rendered_in_halves() -> None:
    from sadtalker.errors import SadTalkerError

    expected = CollectingSink()
    make_renderer(10).render(expected, batch_size=2)
    renderer = make_renderer(10)
    capped = MemoryCappedGenerator(fits=2)
    renderer._generator = capped
    sink = CollectingSink()
    assert renderer.render(sink, batch_size=8) == 10
    assert capped.batches[:3] == [8, 4, 2], "halved until a batch fits"
    assert [first for first, _ in sink.batches] == [0, 2, 4, 6, 8]
    np.testing.assert_array_equal(sink.frames(), expected.frames())

    renderer._generator = MemoryCappedGenerator(fits=0)
    with pytest.raises(SadTalkerError, match="out of memory rendering a single frame"):
        renderer.render(CollectingSink(), batch_size=4)
