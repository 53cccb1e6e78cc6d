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


class UpscalerNotFoundError(ModelNotFoundError):
    """The upscaler name is neither a built-in nor a model file in the upscaler folders."""


class UpscalerFileMissingError(UpscalerNotFoundError):
    """A model file that was listed (or given as a path) is not on disk."""


class ImageModelLoadError(CheckpointLoadError):
    """A model file exists but cannot be read, or spandrel cannot identify its architecture."""


class UpscaleRequestError(StudioError):
    """The requested size/tiling makes no sense (both a scale and a size, a negative scale, ...)."""


class ControlNetError(StudioError):
    """A ControlNet unit cannot be used as requested (message names the unit, field or file)."""


class ControlNetNotFoundError(ControlNetError, ModelNotFoundError):
    """The unit names a model that is not in ``models/ControlNet``."""


class ControlNetFamilyError(ControlNetError):
    """The ControlNet was made for another model family than the loaded checkpoint."""


class AnnotatorMissingError(ControlNetError, ModelNotFoundError):
    """A preprocessor needs annotator weights that are not on disk."""


class AnnotatorLoadError(ControlNetError, CheckpointLoadError):
    """An annotator weight file is there but cannot be used (refused pickle, damaged, wrong file)."""

    def __init__(self, filename: str, message: str) -> None:
        super().__init__(message)
        self.filename = filename
