"""What a job produces: files sent back to the head, which writes them into ``outputs/``.

A worker never writes into ``outputs/`` itself; it sends each finished file as an
:class:`Artifact` (the encoded bytes plus what the head needs to name and record it), so where a
job ran changes nothing about where and how its outputs are saved.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ArtifactKind = Literal["image", "grid", "video", "sidecar", "motion", "frames"]
"""``motion`` and ``frames`` are the intermediate results of a talking head split over workers (a
motion plan, a block of rendered frames): the head keeps them aside, never in ``outputs/``."""


class Artifact(BaseModel):
    """One output file. ``data`` travels base64-encoded in JSON; ``sha256`` is its content address."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", frozen=True)

    kind: ArtifactKind
    folder: str = Field(description="Output folder family: txt2img, img2img, extras, talking-head.")
    extension: str = Field(description="File extension without the dot: png, jpg, webp, mp4, json.")
    data: bytes = Field(repr=False)
    sha256: str = ""
    seed: int | None = None
    infotext: str | None = Field(None, description="A1111 parameters text embedded in the image.")
    stem: str | None = Field(None, description="File name stem for videos and sidecars.")
    pairs_with: str | None = Field(None, description="sha256 of the artifact a sidecar describes.")
    first_frame: int | None = Field(None, ge=0, description="A block of frames: its first frame's index.")

    @model_validator(mode="after")
    def _content_address(self) -> Artifact:
        digest = hashlib.sha256(self.data).hexdigest()
        if self.sha256 and self.sha256 != digest:
            raise ValueError(f"sha256: the data does not match its address {self.sha256}")
        object.__setattr__(self, "sha256", digest)
        return self

    @property
    def ref(self) -> str:
        """How results refer to this artifact before the head has given it a path."""
        return f"artifact:{self.sha256}"


class JobOutcome(BaseModel):
    """How a job ended, as the worker reports it."""

    state: Literal["done", "failed", "cancelled"]
    info: dict[str, Any] = Field(default_factory=dict, description="A1111's info JSON (refs, not paths).")
    artifacts: list[str] = Field(
        default_factory=list, description="Refs of the job's main outputs, in order."
    )
    error: str | None = None
    interrupted: bool = False
    peak_vram_bytes: int | None = Field(
        None, description="The job's peak GPU memory (CUDA workers), for the cost model."
    )
