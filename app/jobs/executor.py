"""Runs requests on this machine's engine, one job at a time per device.

The executor is the seam where the cluster plugs in: a remote executor takes the same request
objects (they serialise to JSON) and returns the same results.
"""

from __future__ import annotations

import threading
from typing import Protocol

from pipelines.engine import GenerationResult, ImageEngine
from pipelines.job_control import JobControl, ProgressCallback
from pipelines.requests import GenerationRequest


class Executor(Protocol):
    def execute(
        self,
        request: GenerationRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult: ...


class LocalExecutor:
    """In-process executor: serialises jobs on the local device with a lock."""

    def __init__(self, engine: ImageEngine) -> None:
        self.engine = engine
        self._device_lock = threading.Lock()

    def execute(
        self,
        request: GenerationRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        with self._device_lock:
            return self.engine.run(request, control=control, on_progress=on_progress)
