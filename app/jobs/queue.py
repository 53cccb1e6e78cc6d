"""The studio's job queue: durable, fair between users, one job at a time per worker.

The UI, the REST API and the CLI submit contract requests here. Saved styles are written into the
prompts when a job is submitted, so the stored request is exactly what runs. A dispatcher hands the
next job (fair order) to an idle worker, preferring one that already has the job's model loaded;
workers report progress, artifacts (written into ``outputs/`` here, as they arrive) and the outcome.
When a worker process dies mid-job the job is queued again, up to ``max_attempts`` runs, and the
worker restarted; the studio itself keeps answering.

With several workers, a job's batches are spread over them (``app/jobs/spread.py``) and a long
talking head is rendered in frame ranges by several of them and joined here
(``app/jobs/talking_head_split.py``); a cost model (``app/jobs/cost_model.py``) places each job where
it should finish first, and in a cluster each new worker runs a short warm-up job to seed it.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.jobs.artifacts import replace_refs, write_artifact
from app.jobs.cost_model import JobCostModel, request_features
from app.jobs.inline_inputs import inline_files
from app.jobs.spread import SpreadJob, part_id, split_id, spread_parts
from app.jobs.store import FINISHED_STATES, JobRecord, JobStore, cut_short_error
from app.jobs.talking_head_split import TalkingHeadSplit, join_talking_head, should_split
from contract.artifacts import JobOutcome
from contract.events import JobProgress
from contract.worker import ArtifactMessage, JobEventMessage, JobFinished, RunJob, StateMessage, WorkerReady
from pipelines.errors import StudioError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from app.styles import StyleStore
    from app.workers.handles import WorkerHandle
    from app.workers.pool import WorkerPool

log = logging.getLogger(__name__)

MAX_WORKER_RESTARTS_WITHOUT_A_JOB = 3
"""A worker that dies this many times in a row before finishing anything is left stopped."""
WARMUP_PREFIX = "warmup-"
WARMUP_REQUEST: dict[str, Any] = {
    "mode": "txt2img",
    "prompt": "a lighthouse on a cliff at dusk",
    "steps": 4,
    "width": 256,
    "height": 256,
    "seed": 1,
    "sampler_name": "Euler",
}
"""The warm-up job a new worker runs while the queue is empty (``warmup=True``): it loads the default
model and gives the cost model the worker's first measurement, including the model load."""


@dataclass
class WorkerStats:
    """What a worker did since the studio started (the Queue tab and /metrics)."""

    since: float = field(default_factory=time.monotonic)
    busy_seconds: float = 0.0
    busy_since: float | None = None
    jobs: int = 0

    def busy_fraction(self) -> float:
        now = time.monotonic()
        busy = self.busy_seconds + (now - self.busy_since if self.busy_since is not None else 0.0)
        return min(1.0, busy / max(1e-9, now - self.since))


@dataclass
class QueueStats:
    """Counters for monitoring: job durations by outcome, requeues after crashes, per-worker time."""

    durations: list[tuple[str, float]] = field(default_factory=list)  # (state, seconds), newest last
    requeues: int = 0
    crash_failures: int = 0
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    since: float = field(default_factory=time.monotonic)  # the queue's start: busy shares count from it

    def worker(self, worker_id: str) -> WorkerStats:
        return self.workers.setdefault(worker_id, WorkerStats(since=self.since))

    def started(self, worker_id: str) -> None:
        self.worker(worker_id).busy_since = time.monotonic()

    def ended(self, worker_id: str, state: str | None, seconds: float) -> None:
        stats = self.worker(worker_id)
        if stats.busy_since is not None:
            stats.busy_seconds += time.monotonic() - stats.busy_since
            stats.busy_since = None
        if state is not None:
            stats.jobs += 1
            self.durations.append((state, seconds))
            del self.durations[:-10000]


class QueueFullError(StudioError):
    """The queue already holds its maximum number of waiting jobs."""


class JobWontFitError(StudioError):
    """By the cost model, the job needs more GPU memory than any worker has."""


@dataclass
class LiveProgress:
    """What a running job is doing right now (not persisted)."""

    worker: str
    event: JobProgress | None = None
    started: float = field(default_factory=time.monotonic)
    sampling_started: float | None = None
    message: str = ""
    preview: bytes | None = None
    paths: dict[str, str] = field(default_factory=dict)  # artifact ref -> written path
    written: dict[str, Path] = field(default_factory=dict)  # sha256 -> path (videos, for sidecars)
    features: Any = None  # the cost model's view of the job (app/jobs/cost_model.py)
    predicted_seconds: float | None = None

    def eta_seconds(self) -> float | None:
        fraction = self.event.fraction if self.event else 0.0
        if not fraction or self.sampling_started is None:
            if self.predicted_seconds is None:
                return None
            return max(0.0, self.predicted_seconds - (time.monotonic() - self.started))
        elapsed = time.monotonic() - self.sampling_started
        return max(0.0, elapsed / fraction - elapsed)


@dataclass(frozen=True)
class JobStatus:
    id: str
    owner: str
    kind: str
    state: str
    position: int | None  # 1-based place among queued jobs
    progress: float
    step: int
    steps: int
    eta_seconds: float | None
    message: str
    images: list[str]
    info: dict[str, Any] | None
    error: str | None
    preview: bytes | None = None  # a small JPEG of the running job's current image
    worker: str | None = None
    attempts: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class JobQueue:
    """Owns the dispatcher; thread-safe."""

    def __init__(
        self,
        store: JobStore,
        workers: WorkerPool,
        *,
        outputs_root: Path,
        styles: StyleStore | None = None,
        max_queued: int = 100,
        max_attempts: int = 2,
        preview_mode: Callable[[], tuple[str, int]] | None = None,
        checkpoint_title: Callable[[str], str | None] | None = None,
        split_seconds: float = 8.0,
        parts_root: Path | None = None,
        release_inputs: Callable[[dict[str, Any]], None] | None = None,
        warmup: bool = False,
    ) -> None:
        """``split_seconds``: talking heads with at least this much speech are rendered by several
        workers when more than one is ready (-1: never); ``parts_root`` keeps their parts meanwhile;
        ``release_inputs`` removes a finished job's staged upload files; with ``warmup`` each new worker
        runs :data:`WARMUP_REQUEST` when it is idle and nothing waits (its images are discarded)."""
        self.store = store
        self.workers = workers
        self.outputs_root = Path(outputs_root)
        self.styles = styles
        self.max_queued = max_queued
        self.max_attempts = max_attempts
        self.preview_mode = preview_mode or (lambda: ("auto", 1))
        self.checkpoint_title = checkpoint_title or (lambda name: name)
        self._live: dict[str, LiveProgress] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._dispatcher: threading.Thread | None = None
        self._failed_starts: dict[str, int] = {}
        self.cost_model = JobCostModel()
        self.stats = QueueStats()
        self._spread: dict[str, SpreadJob] = {}
        self._cancelled: set[str] = set()  # running jobs a user cancelled (not merely interrupted)
        self.split_seconds = split_seconds
        self.parts_root = Path(parts_root) if parts_root is not None else self.outputs_root.parent / "parts"
        self.release_inputs = release_inputs or (lambda request: None)
        self.warmup = warmup
        self._warmed: set[str] = set()  # workers that ran (or were given) their warm-up
        self._warmups: dict[str, tuple[Any, float]] = {}  # warm-up run -> (features, started)

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Requeue (or fail, past the attempt bound) jobs a crash interrupted, then start the
        workers and the dispatcher."""
        requeued, failed = self.store.recover(self.max_attempts)
        if requeued:
            log.warning("requeued %d job(s) interrupted by a restart", len(requeued))
        for job_id in failed:
            log.error("job %s failed: it was cut short %d times", job_id, self.max_attempts)
        shutil.rmtree(self.parts_root, ignore_errors=True)  # split talking heads of a run that ended
        self.stats.since = time.monotonic()
        self.workers.start(self)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="job-dispatcher", daemon=True)
        self._dispatcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            for job_id, live in self._live.items():
                self._control(job_id, live, "interrupt")
            self._wake.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        self.workers.stop(timeout)

    def abandon(self) -> None:
        """The studio is shutting down to restart: stop dispatching and leave running jobs as the
        store has them ("running"), so the next start requeues them once, as after a crash. Workers
        that die from here on (the cluster's Ray stopping, worker processes ending with the studio)
        change nothing: they would otherwise count a second attempt, or fail the job."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    # submitting and controlling ----------------------------------------------------------------
    def submit(self, request: Any, *, owner: str = "local") -> str:
        from app.styles import apply_request_styles

        request = apply_request_styles(request, self.styles)
        payload = request.model_dump(mode="json")
        self._check_fits(payload)
        job_id = self.store.add(owner, payload.get("mode", "txt2img"), payload, max_queued=self.max_queued)
        if job_id is None:
            raise QueueFullError(f"The queue is full ({self.max_queued} jobs waiting). Try again later.")
        with self._wake:
            self._wake.notify_all()
        return job_id

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or interrupt a running one. False if it already finished.

        Claiming a job and registering it as running happen under the same lock as this check, so
        a job is always either still cancellable in the store or known here as running.
        """
        with self._lock:
            if self.store.cancel_queued(job_id):
                return True
            live = self._live.get(job_id)
            if live is not None:
                self._cancelled.add(job_id)  # ends "cancelled", with the picture as it stood
                self._control(job_id, live, "interrupt")
                return True
        return False

    def interrupt(self, job_id: str) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                self._control(job_id, live, "interrupt")

    def skip(self, job_id: str) -> None:
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                self._control(job_id, live, "skip")

    def _control(self, job_id: str, live: LiveProgress, action: str) -> None:
        spread = self._spread.get(job_id)
        if spread is not None:
            if action == "interrupt":
                spread.stop_pending("Interrupted before this batch started.")
                targets = sorted(spread.running.items())
            else:  # Skip abandons the current batch: the earliest one still running
                targets = sorted(spread.running.items())[:1]
            for index, worker in targets:
                self._control_one(part_id(job_id, index), worker, action)
            return
        self._control_one(job_id, live.worker, action)

    def _control_one(self, job_id: str, worker: str, action: str) -> None:
        handle = self.workers.get(worker)
        if handle is None:
            return
        try:
            handle.control(job_id, action)
        except (ConnectionError, OSError):
            log.warning("worker %s is gone; %s of job %s not delivered", worker, action, job_id)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._live)

    # reading -----------------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus | None:
        record = self.store.get(job_id)
        if record is None:
            return None
        return self._status(record)

    def _status(self, record: JobRecord) -> JobStatus:
        with self._lock:
            live = self._live.get(record.id)
        position = None
        if record.state == "queued":
            order = self.store.queued_ids()
            position = order.index(record.id) + 1 if record.id in order else None
        event = live.event if live else None
        result = record.result or {}
        message = live.message if live else (record.error or "")
        return JobStatus(
            id=record.id,
            owner=record.owner,
            kind=record.kind,
            state=record.state,
            position=position,
            progress=1.0 if record.state == "done" else (event.fraction if event else 0.0),
            step=event.step if event else 0,
            steps=event.steps if event else 0,
            eta_seconds=live.eta_seconds() if live else self._queued_eta(record, position),
            message=message,
            images=list(result.get("images", record.outputs)),
            info=result.get("info"),
            error=record.error if record.state in FINISHED_STATES else None,
            preview=live.preview if live else None,
            worker=self._workers_of(record.id, live),
            attempts=record.attempts,
        )

    def _workers_of(self, job_id: str, live: LiveProgress | None) -> str | None:
        spread = self._spread.get(job_id)
        if spread is not None and spread.running:
            return ", ".join(sorted(set(spread.running.values())))
        return live.worker if live else None

    def list(self, *, owner: str | None = None, limit: int = 50) -> list[JobStatus]:
        return [self._status(record) for record in self.store.list(owner=owner, limit=limit)]

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.1) -> JobStatus:
        """Block until the job finishes (for blocking API calls and the CLI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status is None:
                raise KeyError(job_id)
            if status.finished:
                return status
            if deadline is not None and time.monotonic() > deadline:
                return status
            with self._wake:
                self._wake.wait(poll)

    # dispatching -------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                dispatched = self._dispatch_one()
                if not dispatched:
                    self._wake.wait(0.5)

    def _dispatch_one(self) -> bool:
        """Give the next job (fair order) to the worker that will finish it first, if that worker
        is idle now (a fast GPU about to be free beats a slow idle one). Called with the lock held."""
        idle = self.workers.idle()
        if not idle:
            return False
        if self._dispatch_part(idle):
            return True
        upcoming = self.store.peek_next()
        if upcoming is None:
            return self._dispatch_warmup(idle)
        choice = self._placement(upcoming, idle)
        if choice is None:
            return False  # a busy worker will finish it sooner: wait for it
        handle, features, predicted = choice
        record = self.store.claim_next()
        if record is None:
            return False
        if record.id != upcoming.id:  # the peeked job was cancelled meanwhile: place this one
            handle = self._best_worker(record, idle)
            features, predicted = self._predict(record, handle)
        live = LiveProgress(
            worker=handle.worker_id, message="Starting…", features=features, predicted_seconds=predicted
        )
        self._live[record.id] = live
        ready = len(self._ready_workers())
        if should_split(record.request, ready, self.split_seconds):  # motion here, frames anywhere
            split = TalkingHeadSplit.start(record.id, record.request, self.parts_root)
            self._spread[record.id] = split
            live.predicted_seconds = None
            self._start_part(split, split.pending.pop(0), handle, attempt=record.attempts)
            return True
        parts = spread_parts(record.request) if ready > 1 else None
        if parts is not None:  # its batches go to whichever workers are free, this one first
            spread = SpreadJob(record.id, parts, pending=list(range(len(parts))))
            self._spread[record.id] = spread
            live.predicted_seconds = None  # per part from here on
            self._start_part(spread, spread.pending.pop(0), handle, attempt=record.attempts)
            return True
        try:
            self._run_on(handle, record.id, record.request, record.attempts)
        except (ConnectionError, OSError) as exc:
            handle.current_job = None
            self._live.pop(record.id, None)
            self.store.requeue_after_crash(record.id, f"worker {handle.worker_id} unreachable: {exc}")
        return True

    def _run_on(
        self, handle: WorkerHandle, job_id: str, request: dict[str, Any], attempt: int, **fields: Any
    ) -> None:
        """Send one run (a job or a part of one) to ``handle``; ConnectionError if it is gone. A worker
        on another PC gets the job's input files with it."""
        mode, every = self.preview_mode()
        stage = fields.get("stage") or {}
        if getattr(handle, "remote", False) and stage.get("kind") != "frames":
            fields["files"] = inline_files(request)
        message = RunJob(
            job_id=job_id,
            request=request,
            attempt=attempt,
            preview_mode=mode,  # type: ignore[arg-type]
            preview_every=every,
            **fields,
        )
        self.stats.started(handle.worker_id)
        handle.run(message)

    def _dispatch_warmup(self, idle: list[WorkerHandle]) -> bool:
        """Give an idle worker that never ran anything its warm-up (lock held, nothing queued)."""
        if not self.warmup:
            return False
        for handle in idle:
            if handle.worker_id in self._warmed:
                continue
            self._warmed.add(handle.worker_id)
            if handle.state.jobs_done:
                continue  # it has been measured by real jobs already
            job_id = f"{WARMUP_PREFIX}{handle.worker_id}"
            features = request_features(WARMUP_REQUEST, loaded=self._has_loaded(handle, None))
            self._warmups[job_id] = (features, time.monotonic())
            try:
                self._run_on(handle, job_id, WARMUP_REQUEST, 1, warmup=True)
            except (ConnectionError, OSError):
                handle.current_job = None
                self._warmups.pop(job_id, None)
            return True
        return False

    def _warmup_finished(self, handle: WorkerHandle, job_id: str, outcome: JobOutcome) -> None:
        """A warm-up ended (lock held): its time seeds the cost model; nothing is stored."""
        features, started = self._warmups.pop(job_id)
        self.stats.ended(handle.worker_id, None, 0.0)
        if handle.current_job == job_id:
            handle.current_job = None
        if outcome.state == "done":
            seconds = time.monotonic() - started
            family = handle.state.current_family
            self.cost_model.record(
                handle.worker_id, family, features, seconds, peak_vram_bytes=outcome.peak_vram_bytes
            )
            log.info("worker %s warmed up in %.1f s", handle.worker_id, seconds)
        else:
            log.warning("worker %s: warm-up job %s: %s", handle.worker_id, outcome.state, outcome.error)

    # spreading a job's batches ------------------------------------------------------------------
    def _ready_workers(self) -> list[WorkerHandle]:
        return [handle for handle in self.workers.handles if handle.ready or handle.current_job]

    def _dispatch_part(self, idle: list[WorkerHandle]) -> bool:
        """Start the next waiting part of a spread job (they go before new jobs: the job has begun)."""
        for spread in list(self._spread.values()):
            if spread.pending:
                record = self.store.get(spread.job_id)
                if record is None:
                    continue
                handle = self._best_worker(record, idle)
                self._start_part(spread, spread.pending.pop(0), handle, attempt=1)
                return True
        return False

    def _start_part(self, spread: SpreadJob, index: int, handle: WorkerHandle, *, attempt: int) -> None:
        request = spread.parts[index]
        if spread.records_costs:
            features = request_features(request, loaded=self._has_loaded(handle, None))
            family = handle.state.current_family
            spread.predicted[index] = (
                features,
                self.cost_model.predict_seconds(handle.worker_id, family, features),
            )
        spread.started[index] = time.monotonic()
        spread.running[index] = handle.worker_id
        spread.attempts[index] = spread.attempts.get(index, 0) + 1
        try:
            self._run_on(
                handle,
                part_id(spread.job_id, index),
                request,
                max(attempt, spread.attempts[index]),
                **spread.run_fields(index),
            )
        except (ConnectionError, OSError) as exc:
            handle.current_job = None
            spread.running.pop(index, None)
            spread.pending.insert(0, index)
            log.warning(
                "worker %s unreachable for part %d of job %s: %s", handle.worker_id, index, spread.job_id, exc
            )

    def _part_finished(
        self, handle: WorkerHandle, spread: SpreadJob, index: int, outcome: JobOutcome
    ) -> None:
        """Record a part's end (lock held); when the last part ends, finish the job as one."""
        worker = spread.running.pop(index, None)
        features, predicted = spread.predicted.get(index, (None, None))
        seconds = time.monotonic() - spread.started.get(index, time.monotonic())
        self.stats.ended(handle.worker_id, outcome.state, seconds)
        if features is not None and outcome.state == "done" and worker is not None:
            self.cost_model.record(
                worker,
                handle.state.current_family,
                features,
                seconds,
                predicted=predicted,
                peak_vram_bytes=outcome.peak_vram_bytes,
            )
        spread.outcomes[index] = outcome
        if isinstance(spread, TalkingHeadSplit) and index == 0 and outcome.state == "done":
            if spread.stopped:
                spread.outcomes[index] = JobOutcome(
                    state="cancelled", error="Interrupted after the motion stage."
                )
            elif (error := spread.add_frame_parts(len(self._ready_workers()))) is not None:
                spread.outcomes[index] = outcome = JobOutcome(state="failed", error=error)
        if outcome.state == "failed":  # one failed batch fails the job: stop the rest
            self._stop_other_parts(spread, outcome.error or "failed")
        if not spread.finished:
            return
        if isinstance(spread, TalkingHeadSplit):
            self._talking_head_parts_done(spread)
            return
        live = self._live.get(spread.job_id)
        paths = live.paths if live else {}
        merged = spread.merged(paths)
        result = None
        if merged.state == "done":
            images = [paths.get(ref, ref) for ref in merged.artifacts]
            result = {"images": images, "info": replace_refs(merged.info, paths)}
        state = "cancelled" if spread.job_id in self._cancelled else merged.state
        self._cancelled.discard(spread.job_id)
        self.store.finish(spread.job_id, state, result=result, error=merged.error)
        self._live.pop(spread.job_id, None)
        self._spread.pop(spread.job_id, None)

    def _part_lost(self, spread: SpreadJob, index: int, reason: str) -> str:
        """A part's worker died (lock held): its files go, and it runs again elsewhere, unless it
        has stopped its worker ``max_attempts`` times (then the job fails with the reason)."""
        spread.running.pop(index, None)
        for path in spread.files.pop(index, []):
            path.unlink(missing_ok=True)
        if spread.attempts.get(index, 0) >= self.max_attempts:
            error = cut_short_error(spread.attempts.get(index, 0), reason)
            self.stats.crash_failures += 1
            self._part_finished_quietly(spread, index, JobOutcome(state="failed", error=error))
            return "failed"
        self.stats.requeues += 1
        spread.pending.insert(0, index)
        return "queued"

    def _stop_other_parts(self, spread: SpreadJob, reason: str) -> None:
        """One batch failed, so the job fails: parts not started end, running ones are interrupted."""
        spread.stop_pending(reason)
        for other, worker in list(spread.running.items()):
            self._control_one(part_id(spread.job_id, other), worker, "interrupt")

    def _part_finished_quietly(self, spread: SpreadJob, index: int, outcome: JobOutcome) -> None:
        spread.outcomes[index] = outcome
        self._stop_other_parts(spread, outcome.error or "failed")
        if spread.finished:
            self._end_job(spread.job_id, "failed", error=outcome.error)

    def _end_job(
        self, job_id: str, state: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Record a job's end (lock held) and forget what ran it."""
        self.store.finish(job_id, state, result=result, error=error)
        self._live.pop(job_id, None)
        self._cancelled.discard(job_id)
        spread = self._spread.pop(job_id, None)
        if isinstance(spread, TalkingHeadSplit):
            spread.discard()
            self.release_inputs(spread.parts[0])

    # joining a talking head rendered by several workers ------------------------------------------
    def _talking_head_parts_done(self, split: TalkingHeadSplit) -> None:
        """Every part has ended (lock held): join the frames into the video, or end the job as its
        parts did (a failed part fails it; an interrupted one cancels it: no video is kept)."""
        ordered = [split.outcomes[index] for index in range(len(split.parts))]
        failed = next((outcome for outcome in ordered if outcome.state == "failed"), None)
        if failed is not None or split.stopped or any(outcome.state != "done" for outcome in ordered):
            stopped = next((outcome for outcome in ordered if outcome.state == "cancelled"), None)
            state = "failed" if failed is not None and split.job_id not in self._cancelled else "cancelled"
            error = (failed or stopped or JobOutcome(state="cancelled", error="Interrupted.")).error
            self._end_job(split.job_id, state, error=error)
            return
        live = self._live.get(split.job_id)
        if live is not None:
            live.message = f"Joining {split.frame_count} frames from {len(split.parts) - 1} parts…"
        threading.Thread(
            target=self._join_talking_head, args=(split,), name=f"join-{split.job_id}", daemon=True
        ).start()

    def _join_talking_head(self, split: TalkingHeadSplit) -> None:
        """Encode the joined frames with the speech, as one worker would have (outside the lock)."""
        from sadtalker.errors import SadTalkerError, TalkingHeadInterruptedError

        job_id = split.job_id
        try:
            result = join_talking_head(
                split, self.outputs_root, stopped=lambda: split.job_id in self._cancelled
            )
        except TalkingHeadInterruptedError as exc:
            with self._wake:
                self._end_job(job_id, "cancelled", error=str(exc))
                self._wake.notify_all()
            return
        except (SadTalkerError, OSError, ValueError) as exc:
            log.exception("joining the parts of talking head %s failed", job_id)
            with self._wake:
                self._end_job(job_id, "failed", error=f"Joining the rendered frames failed: {exc}")
                self._wake.notify_all()
            return
        for path in (result["images"][0], result["info"]["sidecar"]):
            self.store.record_output(job_id, str(path))
        with self._wake:
            self._end_job(job_id, "done", result=result)
            self._wake.notify_all()

    # placing ---------------------------------------------------------------------------------
    def _checkpoint_of(self, record: JobRecord) -> str | None:
        wanted = (record.request.get("override_settings") or {}).get("sd_model_checkpoint")
        return self.checkpoint_title(str(wanted)) if wanted else None

    def _has_loaded(self, handle: WorkerHandle, title: str | None) -> bool:
        if title is None:  # the default model: loaded if the worker has its current one
            return handle.state.current_checkpoint is not None
        return title in handle.state.loaded_checkpoints

    def _predict(self, record: JobRecord, handle: WorkerHandle) -> tuple[Any, float]:
        features = request_features(
            record.request, loaded=self._has_loaded(handle, self._checkpoint_of(record))
        )
        family = handle.state.current_family
        return features, self.cost_model.predict_seconds(handle.worker_id, family, features)

    def _remaining(self, handle: WorkerHandle) -> float:
        """Predicted seconds until ``handle`` is free (0 when idle)."""
        live = self._live.get(handle.current_job or "")
        if live is None:
            return 0.0
        eta = live.eta_seconds()
        return eta if eta is not None else (live.predicted_seconds or 0.0)

    def _placement(
        self, record: JobRecord, idle: list[WorkerHandle]
    ) -> tuple[WorkerHandle, Any, float] | None:
        """The idle worker to run ``record`` on, with its features and predicted seconds; None when a
        busy worker would finish it clearly sooner than any idle one (by the cost model)."""
        if len(idle) == 1 and len(self.workers.handles) == 1:
            features, predicted = self._predict(record, idle[0])
            return idle[0], features, predicted
        title = self._checkpoint_of(record)
        best_idle: tuple[float, int, WorkerHandle, Any, float] | None = None
        for order, handle in enumerate(idle):
            features, predicted = self._predict(record, handle)
            # Ties (no measurements yet) go to a worker with the model loaded, then one with none.
            rank = 0 if self._has_loaded(handle, title) else (1 if not handle.state.loaded_checkpoints else 2)
            key = (round(predicted, 3), rank * 1000 + order)
            if best_idle is None or key < (round(best_idle[0], 3), best_idle[1]):
                best_idle = (predicted, rank * 1000 + order, handle, features, predicted)
        assert best_idle is not None
        # Waiting for a busy worker compares speeds with the model loaded on both: a model load is
        # paid once, and an idle worker judged by it alone would never be given a job to load it.
        chosen = best_idle[2]
        intrinsic = self.cost_model.predict_seconds(
            chosen.worker_id, chosen.state.current_family, request_features(record.request, loaded=True)
        )
        for handle in self.workers.handles:
            if handle.ready and handle.current_job is not None and self.cost_model.runs() >= len(idle) + 1:
                _, predicted = self._predict(record, handle)
                if self._remaining(handle) + predicted < 0.8 * intrinsic:
                    return None
        return best_idle[2], best_idle[3], best_idle[4]

    def _check_fits(self, payload: dict[str, Any]) -> None:
        """Refuse up front a job whose predicted peak GPU memory exceeds every GPU worker's memory
        (only when every worker is a GPU worker the model has measured: otherwise it may fit)."""
        verdicts: list[tuple[float, int]] = []
        for handle in self.workers.handles:
            total = handle.state.vram_total_bytes
            if not handle.ready or total is None:
                return
            features = request_features(payload, loaded=True)
            needed = self.cost_model.predict_vram(handle.worker_id, handle.state.current_family, features)
            if needed is None or needed <= total:
                return
            verdicts.append((needed, total))
        if verdicts:
            needed = min(need for need, _ in verdicts)
            largest = max(total for _, total in verdicts)
            raise JobWontFitError(
                f"This job would need about {needed / 2**30:.1f} GB of GPU memory, and the largest GPU "
                f"in the studio has {largest / 2**30:.1f} GB. Use a smaller size or batch, or turn on "
                "--medvram/--lowvram."
            )

    def _queued_eta(self, record: JobRecord, position: int | None) -> float | None:
        """Seconds until a queued job should finish: the jobs ahead of it shared over the workers,
        then its own run on the fastest worker (cost model)."""
        if position is None:
            return None
        workers = [handle for handle in self.workers.handles if handle.ready] or self.workers.handles[:1]
        if not workers:
            return None
        with self._lock:
            own = min(self._predict(record, handle)[1] for handle in workers)
            ahead = 0.0
            for job_id in self.store.queued_ids()[: min(position - 1, 20)]:
                other = self.store.get(job_id)
                if other is not None:
                    ahead += min(self._predict(other, handle)[1] for handle in workers)
            busy = sum(self._remaining(handle) for handle in workers)
        return (ahead + busy) / len(workers) + own

    def _best_worker(self, record: JobRecord, idle: list[WorkerHandle]) -> WorkerHandle:
        """A worker that already has the job's model loaded, else one with none loaded, else any."""
        wanted = (record.request.get("override_settings") or {}).get("sd_model_checkpoint")
        if wanted and len(idle) > 1:
            title = self.checkpoint_title(str(wanted))
            for handle in idle:
                if title and title in handle.state.loaded_checkpoints:
                    return handle
            for handle in idle:
                if not handle.state.loaded_checkpoints:
                    return handle
        return idle[0]

    # what workers report -----------------------------------------------------------------------
    def on_worker_message(self, handle: WorkerHandle, message: BaseModel) -> None:
        if isinstance(message, JobEventMessage):
            self._on_progress(message)
        elif isinstance(message, ArtifactMessage):
            self._on_artifact(message)
        elif isinstance(message, JobFinished):
            self._on_finished(handle, message)
        elif isinstance(message, WorkerReady | StateMessage):
            with self._wake:
                if isinstance(message, StateMessage):  # it got through a job: not a start-up crash loop
                    self._failed_starts.pop(handle.worker_id, None)
                self._wake.notify_all()

    def _on_progress(self, message: JobEventMessage) -> None:
        job_id, index = split_id(message.job_id)
        with self._wake:
            live = self._live.get(job_id)
            if live is None:
                return
            event = message.progress
            spread = self._spread.get(job_id)
            if spread is not None and index is not None:  # a part: its place among the job's batches
                done = sum(1 for outcome in spread.outcomes.values() if outcome.state == "done")
                event = event.model_copy(update={"batch_index": done, "batch_count": len(spread.parts)})
            if event.stage == "sampling" and live.sampling_started is None:
                live.sampling_started = time.monotonic()
            if event.message:
                live.message = event.message
            if event.preview is not None:
                live.preview = event.preview
            live.event = event
            self._wake.notify_all()

    def _on_artifact(self, message: ArtifactMessage) -> None:
        job_id, index = split_id(message.job_id)
        with self._lock:
            live = self._live.get(job_id)
            spread = self._spread.get(job_id)
        if live is None or (spread is not None and index not in spread.running):
            log.warning("dropping an artifact of job %s, which is not running", message.job_id)
            return
        artifact = message.artifact
        if artifact.kind in ("motion", "frames"):
            if not isinstance(spread, TalkingHeadSplit) or index is None:
                log.warning(
                    "dropping a %s artifact of job %s, which is not split", artifact.kind, message.job_id
                )
                return
            try:
                kept = spread.keep(index, artifact)
            except (OSError, ValueError) as exc:
                log.warning("dropping an artifact of job %s: %s", message.job_id, exc)
                return
            with self._wake:
                spread.files.setdefault(index, []).append(kept)
            return
        path = write_artifact(self.outputs_root, artifact, paired=live.written)
        self.store.record_output(job_id, str(path))  # so a crash can clean it up
        with self._wake:
            live.paths[artifact.ref] = str(path)
            live.written[artifact.sha256] = path
            if spread is not None and index is not None:
                spread.files.setdefault(index, []).append(path)
            self._wake.notify_all()

    def _on_finished(self, handle: WorkerHandle, message: JobFinished) -> None:
        outcome = message.outcome
        if message.job_id in self._warmups:
            with self._wake:
                self._warmup_finished(handle, message.job_id, outcome)
                self._wake.notify_all()
            return
        job_id, index = split_id(message.job_id)
        spread = self._spread.get(job_id) if index is not None else None
        if spread is not None and index is not None:
            with self._wake:
                if handle.current_job == message.job_id:
                    handle.current_job = None
                if index in spread.running:
                    self._part_finished(handle, spread, index, outcome)
                self._wake.notify_all()
            return
        with self._wake:
            live = self._live.get(message.job_id)
            if live is not None:
                self.stats.ended(handle.worker_id, outcome.state, time.monotonic() - live.started)
            if live is not None and live.features is not None and outcome.state == "done":
                self.cost_model.record(
                    handle.worker_id,
                    handle.state.current_family,
                    live.features,
                    time.monotonic() - live.started,
                    predicted=live.predicted_seconds,
                    peak_vram_bytes=outcome.peak_vram_bytes,
                )
            paths = live.paths if live else {}
            images = [paths.get(ref, ref) for ref in outcome.artifacts]
            result = None
            if outcome.state == "done":
                result = {"images": images, "info": replace_refs(outcome.info, paths)}
            state = "cancelled" if message.job_id in self._cancelled else outcome.state
            self._cancelled.discard(message.job_id)
            self.store.finish(message.job_id, state, result=result, error=outcome.error)
            self._live.pop(message.job_id, None)
            record = self.store.get(message.job_id)
            if record is not None and record.kind == "talking_head":
                self.release_inputs(record.request)
            if handle.current_job == message.job_id:
                handle.current_job = None
            self._wake.notify_all()
        if getattr(handle, "restart_after_job", False):  # settings changed while it worked
            handle.restart_after_job = False  # type: ignore[attr-defined]
            handle.stop()
            handle.start(self)

    def on_worker_exit(self, handle: WorkerHandle, reason: str) -> None:
        """A worker process died: requeue (or fail) its job, then start a fresh worker."""
        with self._wake:
            if self._stopping:  # the studio is going down: the job stays for the next start
                log.info("worker %s ended with the studio (%s)", handle.worker_id, reason)
                return
            job_id = handle.current_job
            handle.current_job = None
            if job_id is not None and self._warmups.pop(job_id, None) is not None:
                self.stats.ended(handle.worker_id, None, 0.0)
                job_id = None  # a warm-up: nothing to requeue
            parent, index = split_id(job_id) if job_id is not None else (None, None)
            spread = self._spread.get(parent) if parent is not None and index is not None else None
            if spread is not None and index is not None and index in spread.running:
                self.stats.ended(handle.worker_id, None, 0.0)
                state = self._part_lost(spread, index, reason)
                log.error(
                    "worker %s: %s during part %d of job %s; part %s",
                    handle.worker_id,
                    reason,
                    index,
                    parent,
                    state,
                )
            elif job_id is not None:
                self._live.pop(job_id, None)
                self.stats.ended(handle.worker_id, None, 0.0)
                state = self.store.requeue_after_crash(job_id, reason, max_attempts=self.max_attempts)
                if state == "queued":
                    self.stats.requeues += 1
                elif state == "failed":
                    self.stats.crash_failures += 1
                log.error("worker %s: %s during job %s; job %s", handle.worker_id, reason, job_id, state)
            else:
                log.error("worker %s: %s", handle.worker_id, reason)
            failures = self._failed_starts.get(handle.worker_id, 0) + (0 if job_id else 1)
            self._failed_starts[handle.worker_id] = failures
            self._wake.notify_all()
        if failures >= MAX_WORKER_RESTARTS_WITHOUT_A_JOB:
            log.error("worker %s keeps dying without running a job; not restarting it", handle.worker_id)
            return
        handle.restarts += 1
        handle.start(self)
