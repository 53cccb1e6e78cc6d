"""The worker process: builds one device's runtime and serves the head's messages until told to stop.

Jobs run on the main thread one at a time; a reader thread takes Interrupt/Skip as they arrive, so
they reach the running job within one sampling step.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from typing import Any

from contract.worker import (
    ControlJob,
    JobFinished,
    RunJob,
    SetDefaultModel,
    Shutdown,
    StateMessage,
    WorkerReady,
    decode_head_message,
    encode_message,
)
from pipelines.job_control import JobControl

CRASH_MARKER_ENV = "SDSTUDIO_WORKER_CRASH_MARKER"
"""Test hook: a job whose prompt contains this text kills its worker process (SIGKILL), the way
the kernel's OOM killer would. Unset in normal use."""


def worker_main(conn: Any, settings_json: str, worker_id: str, device: str) -> None:
    from app.settings import StudioSettings
    from app.workers.runtime import WorkerRuntime, select_cuda_device

    logging.basicConfig(
        level=logging.INFO, format=f"[worker {worker_id}] %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C goes to the head, which stops us in order
    settings = StudioSettings.model_validate_json(settings_json)
    if settings.worker_torch_threads:
        import torch

        torch.set_num_threads(settings.worker_torch_threads)
    select_cuda_device(device)
    runtime = WorkerRuntime.create(settings, worker_id=worker_id, device=device)
    send_lock = threading.Lock()

    def send(message: Any) -> None:
        with send_lock:
            conn.send_bytes(encode_message(message))

    inbox: queue.Queue[Any] = queue.Queue()
    controls: dict[str, JobControl] = {}
    controls_lock = threading.Lock()

    def read() -> None:
        while True:
            try:
                message = decode_head_message(conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(0)  # the head is gone: nobody will collect our results
            if isinstance(message, ControlJob):
                with controls_lock:
                    control = controls.setdefault(message.job_id, JobControl())
                control.interrupt() if message.action == "interrupt" else control.skip()
            elif isinstance(message, Shutdown):
                with controls_lock:
                    for control in controls.values():
                        control.interrupt()
                inbox.put(None)
                return
            else:
                inbox.put(message)

    threading.Thread(target=read, name="head-reader", daemon=True).start()
    send(WorkerReady(state=runtime.state().model_copy(update={"pid": os.getpid()})))
    crash_marker = os.environ.get(CRASH_MARKER_ENV)
    while True:
        message = inbox.get()
        if message is None:
            break
        if isinstance(message, SetDefaultModel):
            runtime.set_default_model(
                message.checkpoint, load=message.load, unload=message.unload, request_id=message.request_id
            )
        elif isinstance(message, RunJob):
            if crash_marker and crash_marker in str(message.request.get("prompt", "")):
                os.kill(os.getpid(), signal.SIGKILL)
            with controls_lock:
                control = controls.setdefault(message.job_id, JobControl())
            outcome = runtime.run(message, send, control)
            with controls_lock:
                controls.pop(message.job_id, None)
            send(JobFinished(job_id=message.job_id, outcome=outcome))
        send(StateMessage(state=runtime.state().model_copy(update={"pid": os.getpid()})))
    runtime.close()
