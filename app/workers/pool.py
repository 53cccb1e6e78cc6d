"""The studio's workers: one per device, started with the queue, restarted when one dies."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from typing import TYPE_CHECKING

from app.workers.handles import InProcessWorkerHandle, ProcessWorkerHandle, WorkerHandle, WorkerListener
from contract.events import WorkerState
from contract.worker import SetDefaultModel

if TYPE_CHECKING:
    from app.services import StudioServices
    from app.settings import StudioSettings


def detect_devices() -> list[str]:
    """One device per CUDA GPU this machine shows, else ``auto`` (a worker then uses MPS or the CPU).

    Counted without importing torch in the head (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``),
    so the UI starts fast; a worker that finds no usable GPU falls back to the CPU by itself.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [item for item in visible.split(",") if item.strip() and item.strip() != "-1"]
        return [f"cuda:{index}" for index in range(len(ids))] or ["cpu"]
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            listing = None
        if listing is not None and listing.returncode == 0:
            count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
            if count:
                return [f"cuda:{index}" for index in range(count)]
    return ["auto"]


def _worker_ids(devices: list[str]) -> list[str]:
    """``cuda0``, ``cpu``, ``cpu-1``...: unique, readable names."""
    ids: list[str] = []
    for device in devices:
        base = device.replace(":", "")
        name, n = base, 1
        while name in ids:
            name, n = f"{base}-{n}", n + 1
        ids.append(name)
    return ids


class WorkerPool:
    def __init__(self, handles: list[WorkerHandle]) -> None:
        if not handles:
            raise ValueError("device_ids: at least one device is needed")
        self.handles = handles
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, services: StudioServices) -> WorkerPool:
        settings = services.settings
        if settings.cluster_address:
            from app.cluster.pool import ClusterWorkerPool, connect
            from app.cluster.security import joining_token

            connect(settings.cluster_address, joining_token(settings.data_dir, None))
            return ClusterWorkerPool(settings)
        devices = list(settings.device_ids or detect_devices())
        ids = _worker_ids(devices)
        if settings.in_process_workers:
            from app.workers.runtime import WorkerRuntime
            from pipelines.generation.previews import LatentPreviewer

            handles: list[WorkerHandle] = []
            for index, (worker_id, device) in enumerate(zip(ids, devices, strict=True)):
                # The first in-process worker shares the services' engine (and its loaded models).
                if index == 0:
                    engine, talking_head = services.engine, services.talking_head
                else:
                    from app.services import build_engine, build_talking_head

                    engine = build_engine(settings, device=device, outputs_root=services.outputs_root)
                    talking_head = build_talking_head(settings, engine, outputs_root=services.outputs_root)
                runtime = WorkerRuntime(
                    engine,
                    talking_head,
                    worker_id=worker_id,
                    device=device,
                    previewer=LatentPreviewer(engine.models.registry.paths.folder("vae_approx")),
                    kind="in-process",
                )
                handles.append(InProcessWorkerHandle(runtime))
            return cls(handles)
        return cls(
            [
                ProcessWorkerHandle(settings, worker_id, device)
                for worker_id, device in zip(ids, devices, strict=True)
            ]
        )

    def start(self, listener: WorkerListener) -> None:
        for handle in self.handles:
            handle.start(listener)

    def stop(self, timeout: float = 10.0) -> None:
        for handle in self.handles:
            handle.stop(timeout)

    def idle(self) -> list[WorkerHandle]:
        return [handle for handle in self.handles if handle.idle]

    def get(self, worker_id: str) -> WorkerHandle | None:
        return next((handle for handle in self.handles if handle.worker_id == worker_id), None)

    def states(self) -> list[WorkerState]:
        return [handle.state for handle in self.handles]

    def current_checkpoint(self) -> str | None:
        """The model loaded on the workers (the first that has one), as its title."""
        for state in self.states():
            if state.current_checkpoint:
                return state.current_checkpoint
        return None

    def apply_settings(self, settings: StudioSettings) -> None:
        for handle in self.handles:
            handle.apply_settings(settings)  # type: ignore[attr-defined]

    def set_default_model(
        self, checkpoint: str | None, *, load: bool = True, unload: bool = False, timeout: float = 600.0
    ) -> list[str]:
        """Every ready worker makes ``checkpoint`` its default (loading it between jobs when
        ``load``); waits up to ``timeout`` for their answers and returns the errors they report."""
        ready = [handle for handle in self.handles if handle.ready]
        request_id = uuid.uuid4().hex
        for handle in ready:
            handle.send(
                SetDefaultModel(checkpoint=checkpoint, load=load, unload=unload, request_id=request_id)
            )
        deadline = time.monotonic() + timeout
        pending = {handle.worker_id for handle in ready}
        while pending and time.monotonic() < deadline:
            for handle in ready:
                if handle.state.answered == request_id:
                    pending.discard(handle.worker_id)
            time.sleep(0.02)
        return [
            f"{handle.worker_id}: {handle.state.last_error}"
            for handle in ready
            if handle.worker_id not in pending and handle.state.last_error
        ]
