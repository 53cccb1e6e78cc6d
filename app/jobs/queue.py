"""The studio's job queue: durable, fair between users, one job at a time per device.

The UI, the REST API and the CLI submit the same request objects here; a worker thread hands
them to an executor (in-process today; a cluster executor later) and keeps the live progress,
which only exists in memory, next to the durable record in the job store.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from app.jobs.executor import Executor
from app.jobs.requests import parse_job_request
from app.jobs.store import FINISHED_STATES, JobRecord, JobStore
from pipelines.errors import GenerationInterruptedError, StudioError
from pipelines.job_control import JobControl, ProgressEvent

log = logging.getLogger(__name__)


class QueueFullError(StudioError):
    """The queue already holds its maximum number of waiting jobs."""


@dataclass
class LiveProgress:
    """What a running job is doing right now (not persisted)."""

    control: JobControl = field(default_factory=JobControl)
    event: ProgressEvent | None = None
    started: float = field(default_factory=time.monotonic)
    sampling_started: float | None = None
    message: str = ""

    def eta_seconds(self) -> float | None:
        fraction = self.event.fraction if self.event else 0.0
        if not fraction or self.sampling_started is None:
            return None
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
    latents: Any = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class JobQueue:
    """Owns the worker thread; thread-safe."""

    def __init__(self, store: JobStore, executor: Executor, *, max_queued: int = 100) -> None:
        self.store = store
        self.executor = executor
        self.max_queued = max_queued
        self._live: dict[str, LiveProgress] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._worker: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Requeue jobs a crash interrupted, then start the worker."""
        requeued = self.store.recover()
        if requeued:
            log.warning("requeued %d job(s) interrupted by a restart", len(requeued))
        self._worker = threading.Thread(target=self._run, name="job-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            for live in self._live.values():
                live.control.interrupt()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # submitting and controlling ----------------------------------------------------------------
    def submit(self, request: Any, *, owner: str = "local") -> str:
        payload = request.model_dump(mode="json")
        job_id = self.store.add(owner, payload.get("mode", "txt2img"), payload, max_queued=self.max_queued)
        if job_id is None:
            raise QueueFullError(f"The queue is full ({self.max_queued} jobs waiting). Try again later.")
        with self._wake:
            self._wake.notify_all()
        return job_id

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or interrupt a running one. False if it already finished."""
        if self.store.cancel_queued(job_id):
            return True
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.control.interrupt()
            return True
        return False

    def interrupt(self, job_id: str) -> None:
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.control.interrupt()

    def skip(self, job_id: str) -> None:
        with self._lock:
            live = self._live.get(job_id)
        if live is not None:
            live.control.skip()

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
        return JobStatus(
            id=record.id,
            owner=record.owner,
            kind=record.kind,
            state=record.state,
            position=position,
            progress=1.0 if record.state == "done" else (event.fraction if event else 0.0),
            step=event.step if event else 0,
            steps=event.steps if event else 0,
            eta_seconds=live.eta_seconds() if live else None,
            message=live.message if live else (record.error or ""),
            images=list(result.get("images", record.outputs)),
            info=result.get("info"),
            error=record.error,
            latents=event.latents if event else None,
        )

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

    # the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
            record = self.store.claim_next()
            if record is None:
                with self._wake:
                    if not self._stopping:
                        self._wake.wait(0.5)
                continue
            self._execute(record)

    def _execute(self, record: JobRecord) -> None:
        live = LiveProgress()
        with self._lock:
            self._live[record.id] = live

        def on_progress(event: ProgressEvent) -> None:
            if event.stage == "saved":
                self.store.record_output(record.id, event.message)
                return
            if event.stage == "sampling" and live.sampling_started is None:
                live.sampling_started = time.monotonic()
            if event.message:
                live.message = event.message
            live.event = event
            with self._wake:
                self._wake.notify_all()

        try:
            request = parse_job_request(record.request)
            result = self.executor.execute(request, control=live.control, on_progress=on_progress)
            payload = {"images": [str(img.path) for img in result.images], "info": result.info()}
            self.store.finish(record.id, "done", result=payload)
        except GenerationInterruptedError as exc:
            self.store.finish(record.id, "cancelled", error=str(exc))
        except StudioError as exc:
            self.store.finish(record.id, "failed", error=str(exc))
        except ValueError as exc:  # request validation and input problems
            self.store.finish(record.id, "failed", error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", record.id)
            self.store.finish(record.id, "failed", error=f"internal error: {exc.__class__.__name__}: {exc}")
        finally:
            with self._wake:
                self._live.pop(record.id, None)
                self._wake.notify_all()
