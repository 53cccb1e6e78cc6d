"""Progress reporting and interruption shared by the engine and whoever runs a job."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """One sampling step (or a stage change) of a job."""

    stage: str  # "loading", "sampling", "decoding", "saved" (message = the file), "done"
    step: int = 0  # steps done in the current batch
    steps: int = 0  # steps per batch
    batch_index: int = 0  # which n_iter batch
    batch_count: int = 1
    message: str = ""
    latents: Any = None  # current latents during sampling, for live previews

    @property
    def fraction(self) -> float:
        """Progress of the whole job in [0, 1]."""
        if self.stage == "done":
            return 1.0
        per_batch = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.batch_index + per_batch) / max(1, self.batch_count))


ProgressCallback = Callable[[ProgressEvent], None]


class JobControl:
    """Thread-safe interrupt/skip flags a UI, API or queue sets while the engine runs.

    ``interrupt`` stops the job after the current step and keeps finished images, plus the
    current batch decoded as it stands (A1111 returns the partly denoised picture: artists
    interrupt when they like the preview); ``skip`` abandons only the current batch and carries on
    with the next one (A1111's Skip).
    """

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self.stopped_at: tuple[int, int] | None = None
        """``(step, steps)`` where an interrupt cut sampling short; its images are marked as such."""

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def should_stop_batch(self) -> bool:
        return self._interrupt.is_set() or self._skip.is_set()

    def clear_skip(self) -> None:
        self._skip.clear()
