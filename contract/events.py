"""What a running job reports: stage changes and sampling progress with a small live preview."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PREVIEW_MAX_SIDE = 256
"""Previews are encoded no larger than this (they travel many times a second)."""
PREVIEW_MIN_INTERVAL = 0.25
"""Seconds between two previews of one job at most (progress itself is sent every step)."""


class JobProgress(BaseModel):
    """One step or stage change of a running job."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    stage: str = Field(description="loading, sampling, decoding, preprocess, render, encode, ...")
    step: int = 0
    steps: int = 0
    batch_index: int = 0
    batch_count: int = 1
    message: str = ""
    eta_seconds: float | None = None
    preview: bytes | None = Field(None, repr=False, description="A small JPEG of the current image.")
    worker: str = ""
    device: str = ""

    @property
    def fraction(self) -> float:
        """Progress of the whole job in [0, 1]."""
        if self.stage == "done":
            return 1.0
        per_batch = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.batch_index + per_batch) / max(1, self.batch_count))


class WorkerState(BaseModel):
    """What a worker tells the head about itself (the UI and API read models from here)."""

    worker: str
    device: str
    pid: int | None = None
    host: str | None = Field(None, description="The PC the worker runs on (cluster workers).")
    vram_total_bytes: int | None = Field(None, description="The GPU's memory (CUDA workers).")
    alive: bool = True
    busy_job: str | None = None
    loaded_checkpoints: list[str] = Field(default_factory=list)
    current_checkpoint: str | None = None
    current_family: str | None = None
    jobs_done: int = 0
    restarts: int = 0
    kind: Literal["process", "in-process", "ray"] = "process"
    last_error: str | None = Field(None, description="Why the last model switch failed, if it did.")
    answered: str | None = Field(None, description="request_id of the last model switch done.")
