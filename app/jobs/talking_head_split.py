"""A long talking head rendered by several workers at once, equal frame for frame to one worker's.

Rendering dominates a talking head (seconds per frame on a small GPU), and every frame depends only
on the whole clip's motion coefficients, never on other frames. So when more than one worker is
ready, the queue runs such a job as parts (``<job>.p<k>``, as a spread image batch):

1. part 0, the **motion** stage, on one worker: face crop, 3DMM coefficients, speech -> motion; it
   answers with a motion plan (``sadtalker/motion_plan.py``);
2. parts 1..n, **frame ranges** on whichever workers are free: each renders, pastes back and
   enhances its frames from the plan (ranges start on batch boundaries, so each batch is the one the
   whole clip would render) and sends them back losslessly in blocks;
3. the head **joins** the blocks in order and encodes them with the speech through the same encoder
   a single worker uses (``sadtalker.engine.write_clip``): same frames in, same video out.

Intermediate files live in the head's ``data/talking-head-parts/<job>/`` and are removed when the job
ends. A part whose worker dies runs again elsewhere (its blocks deleted), as a spread batch does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from app.jobs.spread import SpreadJob
from contract.artifacts import Artifact

CHUNKS_PER_WORKER = 2
"""Frame ranges per ready worker: a fast GPU takes more of them than a slow one."""
MIN_CHUNK_FRAMES = 8
"""No range is shorter than this (each costs one plan transfer and the renderer's per-clip setup)."""
MOTION_PART = 0


def should_split(request: dict[str, Any], ready_workers: int, min_seconds: float) -> bool:
    """Split a talking head when several workers are ready and its speech lasts ``min_seconds`` or
    more (a WAV's header says; other formats are split, their length being unknown until decoded).
    ``min_seconds < 0`` never splits."""
    if request.get("mode") != "talking_head" or ready_workers < 2 or min_seconds < 0:
        return False
    from contract.budget import wav_duration_seconds

    seconds = wav_duration_seconds(request.get("audio"))
    return seconds is None or seconds >= min_seconds


@dataclass
class TalkingHeadSplit(SpreadJob):
    """Parts of one talking head: the motion stage first, then the frame ranges it makes possible."""

    scratch: Path = Path()
    plan: bytes | None = None
    stages: dict[int, dict[str, Any]] = field(default_factory=dict)
    frame_count: int = 0

    records_costs: ClassVar[bool] = False  # a part is a fraction of the job the cost model knows

    @classmethod
    def start(cls, job_id: str, request: dict[str, Any], scratch_root: Path) -> TalkingHeadSplit:
        scratch = Path(scratch_root) / job_id
        shutil.rmtree(scratch, ignore_errors=True)  # leftovers of a run the head did not finish
        scratch.mkdir(parents=True)
        return cls(
            job_id,
            [request],
            pending=[MOTION_PART],
            scratch=scratch,
            stages={MOTION_PART: {"kind": "motion"}},
        )

    def run_fields(self, index: int) -> dict[str, Any]:
        return {"stage": self.stages[index]}

    def keep(self, index: int, artifact: Artifact) -> Path:
        """Store a part's motion plan or block of frames in the job's scratch folder."""
        if artifact.kind == "motion" and index == MOTION_PART:
            path = self.scratch / "motion.npz"
        elif artifact.kind == "frames" and index != MOTION_PART and artifact.first_frame is not None:
            path = self.scratch / f"frames-{artifact.first_frame:07d}.npz"
        else:
            raise ValueError(f"a {artifact.kind} artifact does not belong to part {index}")
        temporary = path.with_suffix(".part")
        temporary.write_bytes(artifact.data)
        temporary.replace(path)
        return path

    def add_frame_parts(self, ready_workers: int) -> str | None:
        """After the motion stage: one part per frame range. Returns an error, or None."""
        from sadtalker.motion_plan import MotionPlan, frame_ranges

        try:
            data = (self.scratch / "motion.npz").read_bytes()
            plan = MotionPlan.from_bytes(data)
        except (OSError, ValueError) as exc:
            return f"The motion stage sent no usable motion plan ({exc})."
        self.plan = data
        self.frame_count = plan.frame_count
        wanted = min(max(1, ready_workers) * CHUNKS_PER_WORKER, max(1, plan.frame_count // MIN_CHUNK_FRAMES))
        request = self.parts[MOTION_PART]
        for start, end in frame_ranges(plan.frame_count, wanted, plan.options.batch_size):
            index = len(self.parts)
            self.parts.append(request)
            self.stages[index] = {"kind": "frames", "start": start, "end": end, "plan": data}
            self.pending.append(index)
        return None

    def frame_blocks(self) -> list[Path]:
        """The rendered blocks in frame order."""
        return sorted(self.scratch.glob("frames-*.npz"))

    def discard(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def join_talking_head(
    split: TalkingHeadSplit, outputs_root: Path, *, stopped: Callable[[], bool] = lambda: False
) -> dict[str, Any]:
    """Encode the parts' frames, in order, with the speech into ``outputs/talking-head/`` (MP4 and
    JSON sidecar, as a single worker writes them); returns the job's result. Raises
    ``TalkingHeadInterruptedError`` once ``stopped()`` answers True, ``SadTalkerError`` when a block
    is missing or damaged."""
    import dataclasses
    from datetime import datetime

    from sadtalker.engine import write_clip
    from sadtalker.errors import SadTalkerError, TalkingHeadInterruptedError
    from sadtalker.motion_plan import MotionPlan, unpack_frames

    if split.plan is None:
        raise SadTalkerError("the motion stage's plan is missing")
    plan = MotionPlan.from_bytes(split.plan)
    request = split.parts[MOTION_PART]
    frame_parts = [split.outcomes[index] for index in sorted(split.outcomes) if index != MOTION_PART]
    seconds = dict(plan.stage_seconds)
    for outcome in frame_parts:
        for name, value in (outcome.info.get("stage_seconds") or {}).items():
            seconds[name] = seconds.get(name, 0.0) + float(value)
    plan = dataclasses.replace(plan, stage_seconds=seconds)

    def produce(sink: Callable[[Any, int], None]) -> None:
        for path in split.frame_blocks():
            if stopped():
                raise TalkingHeadInterruptedError(
                    "The talking head was interrupted while joining; no video was saved."
                )
            try:
                first, frames = unpack_frames(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise SadTalkerError(f"a block of rendered frames is damaged ({exc})") from exc
            for offset, frame in enumerate(frames):
                sink(frame, first + offset)

    ranges = [
        [split.stages[index]["start"], split.stages[index]["end"]] for index in sorted(split.stages) if index
    ]
    devices = sorted(
        {str(outcome.info.get("device")) for outcome in frame_parts if outcome.info.get("device")}
    )
    result = write_clip(
        outputs_root,
        plan,
        produce,
        audio_path=Path(str(request["audio"])),
        extra={"device": ", ".join(devices), "frame_ranges": ranges},
    )
    info = {
        "video": str(result.path),
        "sidecar": str(result.sidecar),
        "duration": result.duration,
        "frames": result.frames,
        "seed": result.seed,
        "stage_seconds": result.stage_seconds,
        "parameters": request,
        "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        "frame_ranges": ranges,
        "workers": sorted({str(part.info["worker"]) for part in frame_parts if part.info.get("worker")}),
    }
    return {"images": [str(result.path)], "info": info}
