"""Spreading one job's batches over several workers, image for image equal to one worker's run.

A job of ``n_iter`` batches (A1111's "batch count") is run as ``n_iter`` parts of one batch each,
each part on whichever worker is free: part ``k`` takes the seeds ``seed + k * batch_size`` onwards
(and the same for variation subseeds), exactly the seeds the one-worker run gives its ``k``-th batch,
so every image is the same. A random seed (-1) is fixed by the head first. Images of one batch stay
together on one worker: splitting a GPU batch would change its arithmetic (by a grey level here
and there) and lose the batch's speed.

A part whose worker dies is run again elsewhere (its partial files deleted; the attempt bound
counts per part); finished parts are kept, nothing runs twice. Parts report under their own job id
(``<job>.p<k>``) and are put back together, in order, into one job result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from contract.artifacts import JobOutcome

PART_MARK = ".p"
SPREAD_MODES = ("txt2img", "img2img")
MAX_SEED = 2**32 - 1


def part_id(job_id: str, index: int) -> str:
    return f"{job_id}{PART_MARK}{index}"


def split_id(message_job_id: str) -> tuple[str, int | None]:
    """``(job id, part index)`` of a worker message's job id (``None``: a whole job)."""
    head, mark, tail = message_job_id.rpartition(PART_MARK)
    if mark and tail.isdigit() and head:
        return head, int(tail)
    return message_job_id, None


def spread_parts(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One request per batch of ``request``, or None when it is not worth spreading."""
    batches = int(request.get("n_iter") or 1)
    if request.get("mode", "txt2img") not in SPREAD_MODES or batches < 2:
        return None
    batch_size = max(1, int(request.get("batch_size") or 1))
    seed = int(request.get("seed", -1))
    if seed < 0:
        seed = random.randrange(0, MAX_SEED - batches * batch_size)
    subseed = int(request.get("subseed", -1))
    if subseed < 0:
        subseed = random.randrange(0, MAX_SEED - batches * batch_size)
    parts = []
    for index in range(batches):
        offset = index * batch_size
        parts.append(
            {
                **request,
                "n_iter": 1,
                "seed": min(MAX_SEED, seed + offset),
                "subseed": min(MAX_SEED, subseed + offset),
            }
        )
    return parts


@dataclass
class SpreadJob:
    """A running job's parts: which wait, which run where, how each ended."""

    job_id: str
    parts: list[dict[str, Any]]
    pending: list[int] = field(default_factory=list)
    running: dict[int, str] = field(default_factory=dict)  # part -> worker id
    outcomes: dict[int, JobOutcome] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    files: dict[int, list[Path]] = field(default_factory=dict)  # part -> files written so far
    started: dict[int, float] = field(default_factory=dict)
    predicted: dict[int, tuple[Any, float]] = field(default_factory=dict)  # part -> (features, seconds)
    stopped: bool = False  # interrupted: no part starts any more

    records_costs: ClassVar[bool] = True
    """Whether each part's run trains the cost model as a job of its request (a batch is one)."""

    def run_fields(self, index: int) -> dict[str, Any]:
        """Extra :class:`~contract.worker.RunJob` fields for part ``index``."""
        return {}

    @property
    def finished(self) -> bool:
        return len(self.outcomes) == len(self.parts)

    def stop_pending(self, reason: str) -> None:
        """Interrupt: parts not started yet end as cancelled (finished parts are kept)."""
        self.stopped = True
        for index in self.pending:
            self.outcomes[index] = JobOutcome(state="cancelled", error=reason)
        self.pending.clear()

    def merged(self, paths: dict[str, str]) -> JobOutcome:
        """The parts as one outcome: images and per-image info lists in part order."""
        ordered = [self.outcomes[index] for index in range(len(self.parts))]
        done = [outcome for outcome in ordered if outcome.state == "done"]
        failed = [outcome for outcome in ordered if outcome.state == "failed"]
        if failed:
            return JobOutcome(state="failed", error=failed[0].error)
        if not done:
            return JobOutcome(state="cancelled", error=ordered[0].error)
        info: dict[str, Any] = dict(done[0].info)
        for key, value in done[0].info.items():
            if isinstance(value, list):
                info[key] = [item for outcome in done for item in outcome.info.get(key, [])]
        return JobOutcome(
            state="done",
            info=info,
            artifacts=[ref for outcome in done for ref in outcome.artifacts],
            interrupted=len(done) < len(ordered) or any(outcome.interrupted for outcome in done),
        )
