"""Errors the talking-head engine raises for users, phrased in their vocabulary with a next step."""

from __future__ import annotations

from pipelines.errors import CheckpointLoadError, StudioError


class SadTalkerError(StudioError):
    """Base for talking-head errors whose message can be shown to a user as is."""


class SadTalkerCheckpointError(SadTalkerError, CheckpointLoadError):
    """A SadTalker model file is missing, unreadable or does not hold the expected weights."""
