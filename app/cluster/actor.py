"""The worker as a Ray actor: the same :class:`~app.workers.runtime.WorkerRuntime` a local worker
process runs, speaking the same contract messages (``contract/worker.py``) as bytes.

A job is one streaming call (:meth:`WorkerActor.run`) that yields each message the runtime sends
(progress with previews, artifacts, then :class:`JobFinished` and the new state) as it is produced;
Interrupt/Skip arrive as a concurrent :meth:`WorkerActor.control` call (the actor is threaded), so
they reach the job within one sampling step, as locally.

Paths differ between PCs: an actor takes the head's settings but its own folders from its node
(``SDSTUDIO_NODE_MODELS_DIR``/``SDSTUDIO_NODE_DATA_DIR``, set on a joining PC's Ray processes by
``--cluster-join`` from that PC's own settings), unless the studio shares one models folder
(``--cluster-shared-models``). Workers on the head's own node use the head's settings as they are.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NODE_ROOT_ENV = "SDSTUDIO_NODE_ROOT"
"""This PC's studio folder (its ``models/`` and ``data/``); set on a node's Ray processes."""
NODE_MODELS_ENV = "SDSTUDIO_NODE_MODELS_DIR"
NODE_DATA_ENV = "SDSTUDIO_NODE_DATA_DIR"
"""A joining PC's own ``--models-dir``/``--data-dir`` (they win over ``SDSTUDIO_NODE_ROOT``)."""
SHARED_MODELS_ENV = "SDSTUDIO_CLUSTER_SHARED_MODELS"
"""When set (to anything), every node uses the models folder the head's settings name."""
CRASH_MARKER_ENV = "SDSTUDIO_WORKER_CRASH_MARKER"


def node_settings(settings_json: str) -> Any:
    """The head's settings with this node's own folders (see the module docstring)."""
    from app.settings import StudioSettings

    settings = StudioSettings.model_validate_json(settings_json)
    root = os.environ.get(NODE_ROOT_ENV)
    models = os.environ.get(NODE_MODELS_ENV) or (str(Path(root) / "models") if root else None)
    data = os.environ.get(NODE_DATA_ENV) or (str(Path(root) / "data") if root else None)
    update: dict[str, Any] = {}
    if data:
        update["data_dir"] = Path(data)
    if models and not (os.environ.get(SHARED_MODELS_ENV) or settings.cluster_shared_models):
        update["models_dir"] = Path(models)
        for folder in ("ckpt_dir", "vae_dir", "lora_dir", "controlnet_dir", "esrgan_dir", "embeddings_dir"):
            update[folder] = None
    return settings.model_copy(update=update) if update else settings


class WorkerActor:
    """Hosts one worker runtime (one GPU, or one share of it, or the CPU) on a node."""

    def __init__(self, settings_json: str, worker_id: str, device: str) -> None:
        from app.workers.runtime import WorkerRuntime

        settings = node_settings(settings_json)
        import torch

        # Ray starts actors with OMP_NUM_THREADS=1; a CPU worker would crawl on one core.
        torch.set_num_threads(settings.worker_torch_threads or os.cpu_count() or 1)
        self.worker_id = worker_id
        self.runtime = WorkerRuntime.create(settings, worker_id=worker_id, device=device)
        self.runtime.kind = "ray"
        share = int(settings.gpu_share or 1)
        if share > 1 and torch.cuda.is_available():
            # K workers on one GPU: each gets 1/K of its memory as a hard budget (Ray's fractional
            # GPUs are bookkeeping only), and reports that budget to the head's cost model.
            torch.cuda.set_per_process_memory_fraction(1.0 / share)
            self.runtime.vram_share = 1.0 / share
        self.sync: Any = None
        if not (os.environ.get(SHARED_MODELS_ENV) or settings.cluster_shared_models):
            from app.cluster.model_sync import ModelSync, find_library

            library = find_library()
            if library is not None:
                self.sync = ModelSync(self.runtime.engine.models.registry, library)
        self._controls: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._job_lock = threading.Lock()

    def _state_update(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname()}

    def ready(self) -> bytes:
        """:class:`WorkerReady` with the runtime's state (the call returns once the runtime exists)."""
        from contract.worker import WorkerReady, encode_message

        return encode_message(WorkerReady(state=self.runtime.state().model_copy(update=self._state_update())))

    def state(self) -> bytes:
        from contract.worker import StateMessage, encode_message

        return encode_message(
            StateMessage(state=self.runtime.state().model_copy(update=self._state_update()))
        )

    def set_default_model(self, data: bytes) -> bytes:
        from contract.worker import decode_head_message

        message = decode_head_message(data)
        with self._job_lock:  # between jobs, as a worker process does
            checkpoint = message.checkpoint  # type: ignore[union-attr]
            if self.sync is not None and checkpoint and message.load:  # type: ignore[union-attr]
                try:
                    self.sync.ensure_one("checkpoint", checkpoint, lambda text: None)
                except Exception as exc:  # reported as the switch's error, as a failed load is
                    self.runtime.last_error = str(exc)
            self.runtime.set_default_model(
                message.checkpoint,  # type: ignore[union-attr]
                load=message.load,  # type: ignore[union-attr]
                unload=message.unload,  # type: ignore[union-attr]
                request_id=message.request_id,  # type: ignore[union-attr]
            )
        return self.state()

    def control(self, job_id: str, action: str) -> None:
        from pipelines.job_control import JobControl

        with self._lock:
            control = self._controls.setdefault(job_id, JobControl())
        control.interrupt() if action == "interrupt" else control.skip()

    def run(self, data: bytes) -> Iterator[bytes]:
        """Run one job, yielding every message the runtime sends as it sends it (a streaming call)."""
        from contract.artifacts import JobOutcome
        from contract.events import JobProgress
        from contract.worker import JobEventMessage, JobFinished, RunJob, encode_message
        from pipelines.job_control import JobControl

        message = RunJob.model_validate_json(data)
        marker = os.environ.get(CRASH_MARKER_ENV)
        if marker and marker in str(message.request.get("prompt", "")):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: a worker killed mid-job
        with self._lock:
            control = self._controls.setdefault(message.job_id, JobControl())
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def say(text: str) -> None:
            progress = JobProgress(
                stage="loading", message=text, worker=self.worker_id, device=self.runtime.device
            )
            outbox.put(encode_message(JobEventMessage(job_id=message.job_id, progress=progress)))

        def work() -> None:
            try:
                with self._job_lock:
                    if self.sync is not None:
                        try:
                            self.sync.ensure(
                                message.request, self.runtime.engine.models.default_checkpoint, say
                            )
                        except Exception as exc:
                            outcome = JobOutcome(state="failed", error=f"Could not get a model: {exc}")
                            outbox.put(encode_message(JobFinished(job_id=message.job_id, outcome=outcome)))
                            return
                    outcome = self.runtime.run(
                        message, lambda sent: outbox.put(encode_message(sent)), control
                    )
                outbox.put(encode_message(JobFinished(job_id=message.job_id, outcome=outcome)))
            finally:
                with self._lock:
                    self._controls.pop(message.job_id, None)
                outbox.put(None)

        threading.Thread(target=work, name=f"job-{message.job_id}", daemon=True).start()
        while (item := outbox.get()) is not None:
            yield item
        yield self.state()

    def close(self) -> None:
        self.runtime.close()
