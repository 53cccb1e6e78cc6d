"""The talking-head job: one portrait and one speech file -> an MP4 (SadTalker's options)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.budget import check_audio_seconds, checked_image_size, wav_duration_seconds

MAX_SEED = 2**32 - 1
# The reference's UI slider stops at 3 but its CLI takes any float; beyond ~10 the face tears apart.
MAX_EXPRESSION_SCALE = 10.0


class TalkingHeadRequest(BaseModel):
    """One talking-head job; field names follow the reference's options."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["talking_head"] = "talking_head"  # routes the job in a queue shared with image jobs
    image: Path = Field(description="The portrait (PNG/JPEG/WebP).")
    audio: Path = Field(description="The speech (any format ffmpeg reads).")
    pose_style: int = Field(0, ge=0, le=45, description="One of the 46 learned head-motion styles.")
    size: Literal[256, 512] = Field(256, description="Face renderer resolution.")
    preprocess: Literal["crop", "extcrop", "resize", "full", "extfull"] = Field(
        "crop",
        description="crop/extcrop/resize animate the face crop; full/extfull paste it back into the photo.",
    )
    still: bool = Field(False, description="Keep the photo's head pose (little head motion).")
    enhancer: Literal["gfpgan", "RestoreFormer"] | None = Field(
        None, description="Face restorer run on the face of every frame (models/GFPGAN)."
    )
    background_enhancer: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description=(
            "Upscaler from models/ESRGAN run over every whole frame (brought back to the frame's size) "
            "before the face enhancer pastes the restored face over it, as the reference's "
            "--background_enhancer; without a face enhancer the whole frame is enhanced."
        ),
    )
    expression_scale: float = Field(
        1.0,
        ge=0.0,
        le=MAX_EXPRESSION_SCALE,
        description="Strength of the mouth/face motion (1 = as learned; the reference accepts any value).",
    )
    ref_eyeblink: Path | None = Field(None, description="A video whose eye blinks are copied.")
    ref_pose: Path | None = Field(None, description="A video whose head motion is copied.")
    batch_size: int = Field(2, ge=1, le=64, description="Frames rendered at once.")
    render_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Face renderer: fp32 (fused layers, same frames as the reference to float32 rounding) "
        "or bf16 (fast mode: the 2-D decoder in bfloat16, visibly close but not equal).",
    )
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed.")
    input_yaw: list[float] | None = Field(
        None, min_length=1, description="Head yaw path in degrees: the head turns through these angles."
    )
    input_pitch: list[float] | None = Field(
        None, min_length=1, description="Head pitch path in degrees: the head turns through these angles."
    )
    input_roll: list[float] | None = Field(
        None, min_length=1, description="Head roll path in degrees: the head turns through these angles."
    )

    @model_validator(mode="after")
    def _within_memory_budget(self) -> TalkingHeadRequest:
        """The portrait's size (from its header) and, for a WAV, the speech's length against the
        memory budget (``contract/budget.py``); other audio formats are measured where they are
        decoded (the API does so with ffmpeg before decoding)."""
        checked_image_size("image", self.image)
        seconds = wav_duration_seconds(self.audio)
        if seconds is not None:
            check_audio_seconds("audio", seconds)
        return self


class MotionStage(BaseModel):
    """Part of a talking head split over workers: preprocess and audio2coeff only; the worker answers
    with a ``motion`` artifact (``sadtalker/motion_plan.py``) from which any worker renders frames."""

    kind: Literal["motion"] = "motion"


class FramesStage(BaseModel):
    """Part of a talking head split over workers: finished frames ``[start, end)`` of ``plan``, sent
    back as ``frames`` artifacts for the head to join and encode."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    kind: Literal["frames"] = "frames"
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    plan: bytes = Field(repr=False, description="The motion plan's bytes, as the motion stage sent them.")

    @model_validator(mode="after")
    def _ordered(self) -> FramesStage:
        if self.end <= self.start:
            raise ValueError(f"end: the frame range [{self.start}, {self.end}) is empty")
        return self


TalkingHeadStage = Annotated[MotionStage | FramesStage, Field(discriminator="kind")]
