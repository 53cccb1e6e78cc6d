"""Errors the engine raises for users, each phrased in their vocabulary with a next step."""

from __future__ import annotations


class StudioError(Exception):
    """Base for errors whose message is meant to be shown to a user as is."""


class ModelNotFoundError(StudioError):
    """A requested checkpoint/VAE/LoRA is not in the model folders."""


class NoModelsError(ModelNotFoundError):
    """``models/Stable-diffusion`` is empty: nothing to generate with yet."""


class CheckpointLoadError(StudioError):
    """A model file exists but cannot be loaded (corrupt, truncated, unknown layout)."""


class GenerationInterruptedError(StudioError):
    """The user interrupted a job; images finished before that are kept."""


class OutOfMemoryError(StudioError):
    """The GPU ran out of memory even after the lower-memory retry."""
