"""Runs requests on this machine's engine, one job at a time per device.

The executor is the seam where the cluster plugs in: a remote executor takes the same request
objects (they serialise to JSON) and returns the same results.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from app.styles import StyleStore, apply_request_styles
from contract.images import GenerationRequest
from pipelines.generation.engine import GenerationResult, ImageEngine
from pipelines.job_control import JobControl, ProgressCallback


class Executor(Protocol):
    def execute(
        self,
        request: GenerationRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult: ...


class LocalExecutor:
    """In-process executor: serialises jobs on the local device with a lock.

    Saved styles named in a request's ``styles`` are written into its prompts here, so jobs from
    the UI, the API and the CLI get them the same way.
    """

    def __init__(
        self, engine: ImageEngine, *, styles: StyleStore | None = None, talking_head: Any = None
    ) -> None:
        self.engine = engine
        self.styles = styles
        self.talking_head = talking_head  # app.talking_head.TalkingHeadService, built lazily
        self._device_lock = threading.Lock()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the device between jobs (e.g. to switch the default model without racing a job)."""
        with self._device_lock:
            yield

    def execute(
        self,
        request: GenerationRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        if getattr(request, "mode", None) == "talking_head":
            if self.talking_head is None:
                raise ValueError("mode: talking-head jobs are not enabled in this studio")
            with self._device_lock:
                return self.talking_head.run(request, control=control, on_progress=on_progress)
        request = apply_request_styles(request, self.styles)
        with self._device_lock:
            return self.engine.run(request, control=control, on_progress=on_progress)
