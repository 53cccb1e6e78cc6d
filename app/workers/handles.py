"""The head's side of a worker: start it, send it contract messages, hear what it reports.

Two kinds speak the same messages: :class:`ProcessWorkerHandle` (a worker process, the studio's
default; a crash there cannot take the studio down) and :class:`InProcessWorkerHandle` (a thread of
this process: the headless CLI, tests, ``--in-process-workers``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
from typing import TYPE_CHECKING, Any, Protocol

from contract.events import WorkerState
from contract.worker import (
    ControlJob,
    JobFinished,
    RunJob,
    SetDefaultModel,
    Shutdown,
    StateMessage,
    WorkerReady,
    decode_worker_message,
    encode_message,
)
from pipelines.job_control import JobControl

if TYPE_CHECKING:
    from pydantic import BaseModel

    from app.settings import StudioSettings
    from app.workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerListener(Protocol):
    def on_worker_message(self, handle: WorkerHandle, message: BaseModel) -> None: ...

    def on_worker_exit(self, handle: WorkerHandle, reason: str) -> None: ...


class WorkerHandle:
    """What the queue knows of one worker."""

    remote = False
    """True when the worker may be on another PC: the job's input files are sent with it."""

    def __init__(self, worker_id: str, device: str) -> None:
        self.worker_id = worker_id
        self.device = device
        self.state = WorkerState(worker=worker_id, device=device, alive=False)
        self.ready = False
        self.current_job: str | None = None
        self.restarts = 0
        self._listener: WorkerListener | None = None

    @property
    def idle(self) -> bool:
        return self.ready and self.current_job is None

    def start(self, listener: WorkerListener) -> None:
        raise NotImplementedError

    def send(self, message: BaseModel) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def run(self, message: RunJob) -> None:
        self.current_job = message.job_id
        self.send(message)

    def control(self, job_id: str, action: str) -> None:
        self.send(ControlJob(job_id=job_id, action=action))  # type: ignore[arg-type]

    def _deliver(self, message: BaseModel) -> None:
        if isinstance(message, WorkerReady | StateMessage):
            self.state = message.state.model_copy(update={"restarts": self.restarts})
            self.ready = True
        if self._listener is not None:
            self._listener.on_worker_message(self, message)


# ---------------------------------------------------------------------------------------------------
# a worker process


def describe_exit(exitcode: int | None) -> str:
    """A worker's end in words a user understands."""
    if exitcode is None:
        return "the worker process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"the worker process was killed ({name}), probably out of memory"
        return f"the worker process crashed ({name})"
    return f"the worker process exited with code {exitcode}"


class ProcessWorkerHandle(WorkerHandle):
    """A worker in its own process (``spawn``: the same on Linux and Windows, and CUDA-safe)."""

    def __init__(self, settings: StudioSettings, worker_id: str, device: str) -> None:
        super().__init__(worker_id, device)
        self.settings = settings
        self._process: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self.restart_after_job = False

    def apply_settings(self, settings: StudioSettings) -> None:
        """A worker process reads its settings at start: restart it (now if idle, else after its job)."""
        self.settings = settings
        if self.current_job is None and self._listener is not None:
            listener = self._listener
            self.stop()
            self.start(listener)
        else:
            self.restart_after_job = True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, listener: WorkerListener) -> None:
        from app.workers.process_main import worker_main

        self._listener = listener
        self._stopping = False
        self.ready = False
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(
            target=worker_main,
            args=(child, self.settings.model_dump_json(), self.worker_id, self.device),
            name=f"sdstudio-worker-{self.worker_id}",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._conn = parent
        threading.Thread(
            target=self._read,
            args=(parent, self._process),
            name=f"worker-{self.worker_id}-reader",
            daemon=True,
        ).start()

    def _read(self, conn: Any, process: Any) -> None:
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                break
            try:
                message = decode_worker_message(data)
            except ValueError:
                log.exception("worker %s sent a message that is not in the contract", self.worker_id)
                continue
            self._deliver(message)
        process.join(10)
        self.ready = False
        self.state = self.state.model_copy(update={"alive": False, "busy_job": None})
        if not self._stopping and self._listener is not None:
            self._listener.on_worker_exit(self, describe_exit(process.exitcode))

    def send(self, message: BaseModel) -> None:
        with self._send_lock:
            if self._conn is None:
                raise ConnectionError(f"worker {self.worker_id} is not running")
            self._conn.send_bytes(encode_message(message))

    def kill(self) -> None:
        """End the process at once (tests; a worker that stopped answering)."""
        if self._process is not None and self._process.is_alive():
            self._process.kill()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._process is None:
            return
        with contextlib.suppress(ConnectionError, OSError):
            self.send(Shutdown())
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        if self._conn is not None:
            self._conn.close()


# ---------------------------------------------------------------------------------------------------
# a worker thread


class InProcessWorkerHandle(WorkerHandle):
    """The same worker loop on a thread of this process (no crash isolation)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        super().__init__(runtime.worker_id, runtime.device)
        self.runtime = runtime
        self._inbox: queue.Queue[BaseModel | None] = queue.Queue()
        self._controls: dict[str, JobControl] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, listener: WorkerListener) -> None:
        self._listener = listener
        self._thread = threading.Thread(target=self._loop, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()
        self._deliver(WorkerReady(state=self.runtime.state()))

    def send(self, message: BaseModel) -> None:
        if isinstance(message, ControlJob):
            with self._lock:
                control = self._controls.setdefault(message.job_id, JobControl())
            control.interrupt() if message.action == "interrupt" else control.skip()
            return
        self._inbox.put(None if isinstance(message, Shutdown) else message)

    def apply_settings(self, settings: StudioSettings) -> None:
        """New memory options for the next job (models reload with them)."""
        engine = self.runtime.engine
        engine.config.memory_preset = settings.memory_preset
        engine.config.memory_overrides = {**settings.memory_overrides(), "device": self.device}
        engine.config.speed_defaults = settings.speed_defaults()
        engine.models.max_loaded = settings.checkpoints_in_ram
        engine.models.unload_all()

    def _loop(self) -> None:
        from app.workers.runtime import select_cuda_device

        select_cuda_device(self.device)
        while True:
            message = self._inbox.get()
            if message is None:
                return
            if isinstance(message, SetDefaultModel):
                self.runtime.set_default_model(
                    message.checkpoint,
                    load=message.load,
                    unload=message.unload,
                    request_id=message.request_id,
                )
                self._deliver(StateMessage(state=self.runtime.state()))
                continue
            if isinstance(message, RunJob):
                with self._lock:
                    control = self._controls.setdefault(message.job_id, JobControl())
                outcome = self.runtime.run(message, self._deliver, control)
                with self._lock:
                    self._controls.pop(message.job_id, None)
                self._deliver(JobFinished(job_id=message.job_id, outcome=outcome))
                self._deliver(StateMessage(state=self.runtime.state()))

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            for control in self._controls.values():
                control.interrupt()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
