"""What a talking head needs after preprocess and audio2coeff, as bytes any worker can render from.

A long clip can be rendered by several GPUs: one worker runs the per-clip stages (face crop, 3DMM
coefficients, speech -> motion) and sends a :class:`MotionPlan`; each render worker turns the plan
into frames ``[start, end)`` (every frame depends on the whole clip's coefficients, never on other
frames, see ``sadtalker/render.py``); the frames are joined in order and encoded once. The plan holds
the crop the renderer animates, the driving coefficients, the user's head-angle paths, the photo for
the full modes' paste-back and the render options, so a render worker needs neither the portrait
nor the speech file.

The bytes are an ``.npz`` archive read with ``allow_pickle=False``: a plan from another PC is data,
never code.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sadtalker.coefficients import DrivingCoefficients
from sadtalker.render import HeadAngles

PLAN_VERSION = 1
ANGLE_NAMES = ("yaw", "pitch", "roll")


@dataclass(frozen=True)
class RenderOptions:
    """The request's options that rendering, enhancing and encoding read."""

    size: int
    preprocess: str
    batch_size: int
    render_precision: str
    enhancer: str | None = None
    background_enhancer: str | None = None


@dataclass(frozen=True)
class MotionPlan:
    """One clip, ready to render (see the module docstring)."""

    parameters: dict[str, Any]  # the request as JSON, the seed fixed (recorded in the sidecar)
    seed: int
    options: RenderOptions
    face_image: np.ndarray  # (size, size, 3) uint8: the crop the renderer animates
    face_mode: str
    region: tuple[int, int, int, int]  # the photo area the crop shows (full modes paste it back)
    output_size: tuple[int, int]  # (width, height) of the video frames
    coefficients: DrivingCoefficients
    angles: HeadAngles
    duration: float  # seconds of speech
    photo: np.ndarray | None = None  # the full modes' photo; None in the crop modes
    details: dict[str, Any] = field(default_factory=dict)  # landmarks, checkpoints: for the sidecar
    stage_seconds: dict[str, float] = field(default_factory=dict)  # load, preprocess, audio2coeff

    @property
    def frame_count(self) -> int:
        return self.coefficients.frame_count

    def to_bytes(self) -> bytes:
        meta = {
            "version": PLAN_VERSION,
            "parameters": self.parameters,
            "seed": self.seed,
            "options": self.options.__dict__,
            "face_mode": self.face_mode,
            "region": list(self.region),
            "output_size": list(self.output_size),
            "duration": self.duration,
            "details": self.details,
            "stage_seconds": self.stage_seconds,
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "face_image": np.ascontiguousarray(self.face_image, dtype=np.uint8),
            "source": np.asarray(self.coefficients.source, dtype=np.float32),
            "frames": np.asarray(self.coefficients.frames, dtype=np.float32),
        }
        if self.photo is not None:
            arrays["photo"] = np.ascontiguousarray(self.photo, dtype=np.uint8)
        for name in ANGLE_NAMES:
            values = getattr(self.angles, name)
            if values is not None:
                arrays[f"angle_{name}"] = np.asarray(values)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> MotionPlan:
        """The plan in ``data``; ValueError when it is not one (or from an incompatible version)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"not a talking-head motion plan: {exc}") from exc
        if meta.get("version") != PLAN_VERSION:
            raise ValueError(f"motion plan version {meta.get('version')} (this worker reads {PLAN_VERSION})")
        angles = HeadAngles(**{name: arrays.get(f"angle_{name}") for name in ANGLE_NAMES})
        region = tuple(int(value) for value in meta["region"])
        width, height = (int(value) for value in meta["output_size"])
        return cls(
            parameters=meta["parameters"],
            seed=int(meta["seed"]),
            options=RenderOptions(**meta["options"]),
            face_image=arrays["face_image"],
            face_mode=str(meta["face_mode"]),
            region=region,  # type: ignore[arg-type]
            output_size=(width, height),
            coefficients=DrivingCoefficients(source=arrays["source"], frames=arrays["frames"]),
            angles=angles,
            duration=float(meta["duration"]),
            photo=arrays.get("photo"),
            details=dict(meta.get("details") or {}),
            stage_seconds={key: float(value) for key, value in (meta.get("stage_seconds") or {}).items()},
        )


def frame_ranges(frame_count: int, parts: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``frame_count`` frames in at most ``parts`` near-equal pieces,
    each starting on a multiple of ``batch_size``: every range is rendered in the same batches as the
    whole clip would be, so its frames are the same to the last bit."""
    if frame_count <= 0:
        return []
    batch_size = max(1, batch_size)
    batches = -(-frame_count // batch_size)
    parts = max(1, min(parts, batches))
    per_part = -(-batches // parts)
    ranges = []
    for first_batch in range(0, batches, per_part):
        start = first_batch * batch_size
        ranges.append((start, min(frame_count, (first_batch + per_part) * batch_size)))
    return ranges


def pack_frames(frames: np.ndarray, first: int) -> bytes:
    """Finished RGB frames ``(n, h, w, 3)`` uint8 starting at frame ``first``, losslessly compressed."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, frames=np.ascontiguousarray(frames, dtype=np.uint8), first=np.int64(first))
    return buffer.getvalue()


def unpack_frames(data: bytes) -> tuple[int, np.ndarray]:
    """``(first frame index, frames)`` of :func:`pack_frames` bytes; ValueError when damaged."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            frames, first = archive["frames"], int(archive["first"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a block of rendered frames: {exc}") from exc
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"rendered frames of shape {frames.shape} and type {frames.dtype}")
    return first, frames
