# ruff: noqa: F811 (pytest fixtures imported below are requested by parameters of the same name)
"""A talking head split over two workers (motion on one, frame ranges on both, joined by the head)
equals the one-worker render frame for frame, carries the speech, and leaves no intermediate file.

Two in-process CPU workers over the random-weight SadTalker files, with the cheap stand-in face
generator swapped in after loading (the real one costs ~15 s a frame here); the same split over a
real two-node Ray cluster is in ``tests/test_cluster.py``.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.jobs.talking_head_split import should_split
from app.services import StudioServices
from app.settings import StudioSettings
from contract.talking_head import TalkingHeadRequest
from sadtalker.motion_plan import MotionPlan, frame_ranges, pack_frames, unpack_frames
from tests.sadtalker.conftest import astronaut_png, media_dir, sadtalker_models_root, speech_wav  # noqa: F401
from tests.sadtalker.helpers import GatedGenerator, decode_frames, files_in, one_worker_render, probe


class MeetingGenerator(GatedGenerator):
    """The gated stand-in; with a ``meeting`` barrier set, its first render waits until the other
    worker's generator renders too (so a test knows both workers rendered at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.meeting: threading.Barrier | None = None

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        meeting, self.meeting = self.meeting, None
        if meeting is not None:
            meeting.wait()
        return super().render(source_volume, driving_kp, source_kp)


@pytest.fixture(scope="module")
def studio(
    sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[StudioServices, list[MeetingGenerator]]]:
    work = tmp_path_factory.mktemp("split")
    settings = StudioSettings(
        models_dir=sadtalker_models_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        in_process_workers=True,
        device_ids=["cpu", "cpu"],
        talking_head_split_seconds=0,
    )
    services = StudioServices.create(settings)
    queue = services.start_queue()
    generators = []
    for handle in queue.workers.handles:
        generator = MeetingGenerator()
        handle.runtime.talking_head.engine.models(256).generator = generator  # type: ignore[attr-defined]
        generators.append(generator)
    try:
        yield services, generators
    finally:
        for generator in generators:
            generator.gate.set()
        queue.stop()


def request(astronaut_png: Path, speech_wav: Path, **extra: Any) -> TalkingHeadRequest:
    fields: dict[str, Any] = {"image": astronaut_png, "audio": speech_wav, "seed": 7, "batch_size": 2}
    return TalkingHeadRequest(**(fields | extra))


def test_a_split_talking_head_equals_the_one_worker_render(
    studio: tuple[StudioServices, list[MeetingGenerator]],
    sadtalker_models_root: Path,
    astronaut_png: Path,
    speech_wav: Path,
    tmp_path: Path,
) -> None:
    """Full mode (the photo travels in the plan for the paste-back) with a yaw path (angles too)."""
    services, generators = studio
    job = request(astronaut_png, speech_wav, preprocess="full", input_yaw=[0.0, 15.0, -10.0])
    expected = one_worker_render(sadtalker_models_root, tmp_path, job)
    meeting = threading.Barrier(2, timeout=600)  # both workers must render at the same time
    for generator in generators:
        generator.meeting = meeting
    job_id = services.queue.submit(job, owner="split")
    status = services.queue.wait(job_id, timeout=900)
    assert status.state == "done", status.error
    info = status.info or {}
    ranges = info["frame_ranges"]
    assert len(ranges) >= 2 and ranges[0][0] == 0 and ranges[-1][1] == info["frames"]
    assert all(left[1] == right[0] and left[0] % 2 == 0 for left, right in itertools.pairwise(ranges))
    assert info["workers"] == ["cpu", "cpu-1"]
    video = Path(status.images[0])
    assert np.array_equal(decode_frames(video), decode_frames(expected))
    shown, reference = probe(video), probe(expected)
    assert shown["audio_codecs"] == ["aac"] and abs(shown["duration"] - reference["duration"]) < 0.05
    outputs = services.settings.outputs_dir / "talking-head"
    assert files_in(outputs) == sorted([video.name, Path(info["sidecar"]).name])
    assert files_in(services.settings.data_dir / "talking-head-parts") == []


def test_interrupting_a_split_talking_head_keeps_no_video(
    studio: tuple[StudioServices, list[MeetingGenerator]], astronaut_png: Path, speech_wav: Path
) -> None:
    services, generators = studio
    for generator in generators:
        generator.rendering.clear()
        generator.gate.clear()
    job_id = services.queue.submit(request(astronaut_png, speech_wav, seed=8), owner="split")
    assert any(generator.rendering.wait(600) for generator in generators)
    services.queue.interrupt(job_id)
    for generator in generators:
        generator.gate.set()
    status = services.queue.wait(job_id, timeout=900)
    assert status.state == "cancelled", (status.state, status.error)
    outputs = services.settings.outputs_dir / "talking-head"
    assert not [name for name in files_in(outputs) if "-8." in name or name.endswith("-8.mp4")]
    assert files_in(services.settings.data_dir / "talking-head-parts") == []


def test_frame_ranges_start_on_batches_and_cover_the_clip() -> None:
    assert frame_ranges(38, 4, 2) == [(0, 10), (10, 20), (20, 30), (30, 38)]
    assert frame_ranges(5, 8, 2) == [(0, 2), (2, 4), (4, 5)]
    assert frame_ranges(7, 1, 3) == [(0, 7)]
    assert frame_ranges(0, 3, 2) == []
    for frames, parts, batch in ((101, 4, 8), (64, 3, 5), (9, 9, 1)):
        ranges = frame_ranges(frames, parts, batch)
        assert ranges[0][0] == 0 and ranges[-1][1] == frames and len(ranges) <= parts
        assert all(start % batch == 0 and start < end for start, end in ranges)


def test_a_motion_plan_and_frame_blocks_travel_as_plain_data() -> None:
    from sadtalker.coefficients import DrivingCoefficients
    from sadtalker.motion_plan import RenderOptions
    from sadtalker.render import HeadAngles

    rng = np.random.default_rng(0)
    plan = MotionPlan(
        parameters={"image": "a.png", "seed": 3},
        seed=3,
        options=RenderOptions(size=256, preprocess="full", batch_size=2, render_precision="fp32"),
        face_image=rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        face_mode="full",
        region=(1, 2, 30, 40),
        output_size=(64, 48),
        coefficients=DrivingCoefficients(
            source=rng.random(73, dtype=np.float32), frames=rng.random((5, 70), dtype=np.float32)
        ),
        angles=HeadAngles(yaw=np.linspace(0, 1, 5)),
        duration=0.2,
        photo=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
        details={"landmarks": "test"},
    )
    back = MotionPlan.from_bytes(plan.to_bytes())
    assert back.options == plan.options and back.region == plan.region and back.seed == 3
    assert np.array_equal(back.coefficients.frames, plan.coefficients.frames)
    assert np.array_equal(back.face_image, plan.face_image) and np.array_equal(back.photo, plan.photo)
    assert np.array_equal(back.angles.yaw, plan.angles.yaw) and back.angles.pitch is None
    with pytest.raises(ValueError, match="not a talking-head motion plan"):
        MotionPlan.from_bytes(b"PK\x03\x04 not really")
    frames = rng.integers(0, 255, (3, 8, 6, 3), dtype=np.uint8)
    first, again = unpack_frames(pack_frames(frames, 12))
    assert first == 12 and np.array_equal(again, frames)


def test_only_long_enough_talking_heads_are_split(speech_wav: Path) -> None:
    job = {"mode": "talking_head", "audio": str(speech_wav)}  # ~1.5 s of speech
    assert should_split(job, 2, 0) and should_split(job, 2, 1.0)
    assert not should_split(job, 2, 60) and not should_split(job, 1, 0) and not should_split(job, 2, -1)
    assert not should_split({"mode": "txt2img"}, 4, 0)
    assert should_split({"mode": "talking_head", "audio": "speech.mp3"}, 2, 60)  # length unknown


def test_the_split_length_is_a_launch_flag() -> None:
    import launch

    for value, expected in (("0", 0.0), ("-1", -1.0), ("12.5", 12.5)):
        args = launch.studio_flags().parse_args(["--split-talking-head", value])
        assert launch.settings_overrides(args)["talking_head_split_seconds"] == expected
    assert "talking_head_split_seconds" not in launch.settings_overrides(launch.studio_flags().parse_args([]))
