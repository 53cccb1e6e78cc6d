"""Errors the talking-head engine raises for users, phrased in their vocabulary with a next step."""

from __future__ import annotations

from pipelines.errors import CheckpointLoadError, GenerationInterruptedError, StudioError


class SadTalkerError(StudioError):
    """Base for talking-head errors whose message can be shown to a user as is."""


class SadTalkerCheckpointError(SadTalkerError, CheckpointLoadError):
    """A SadTalker model file is missing, unreadable or does not hold the expected weights."""


class AudioFileError(SadTalkerError):
    """The driving audio cannot be used: missing, not audio, unreadable, empty or too short."""


class EmptyAudioError(AudioFileError):
    """The audio file is 0 bytes, holds no samples, or is shorter than one video frame (40 ms)."""


class ImageFileError(SadTalkerError):
    """The source portrait cannot be read as an image."""


class VideoFileError(SadTalkerError):
    """A reference video (eye blinks / head pose) cannot be read."""


class NoFaceError(SadTalkerError):
    """No face was found in the source portrait (or in the first frame of a reference video)."""


class VideoEncodingError(SadTalkerError):
    """ffmpeg failed to encode or mux the result video."""


class TalkingHeadInterruptedError(SadTalkerError, GenerationInterruptedError):
    """The caller's stop hook asked the job to stop; no video (nor a partial file) was kept.

    Also a :class:`GenerationInterruptedError`, so a job queue that handles image jobs' interrupts
    records a talking-head job stopped this way the same way (cancelled, not failed).
    """
