"""The Stable Diffusion safety checker as a preset option (public events need one).

Its files are the user's: ``models/safety_checker/`` holding what the ``CompVis/stable-diffusion-
safety-checker`` repository holds (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
``preprocessor_config.json``). Nothing is downloaded: without them a preset that turns the checker
on is refused with a message saying where the files go.

The checker runs in the worker, on each finished image before it leaves the worker (a job whose
``override_settings`` carry :data:`SAFETY_KEY`, which a checked preset's runs do): a flagged image
is replaced by a black one whose infotext says :data:`HELD_BACK`, so no client, however quick, can
fetch the picture before it was screened. Front ends read that mark (:func:`screen_files`) to say
the picture was held back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import ModelNotFoundError

if TYPE_CHECKING:
    from PIL import Image


log = logging.getLogger(__name__)

FOLDER_NAME = "safety_checker"
SAFETY_KEY = "sdstudio_safety_checker"
"""The ``override_settings`` key that asks the worker to screen a job's images."""
HELD_BACK = "Safety checker: held back"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_loaded: dict[Path, Any] = {}
_load_lock = threading.Lock()


class SafetyCheckerMissingError(ModelNotFoundError):
    """The safety checker's files are not in ``models/safety_checker``."""


def safety_checker_folder(models_root: Path) -> Path:
    return Path(models_root) / FOLDER_NAME


def require_safety_checker(models_root: Path) -> Path:
    """The checker's folder, or an error naming the files it needs."""
    folder = safety_checker_folder(models_root)
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise SafetyCheckerMissingError(
            f"the Stable Diffusion safety checker is not installed: {folder} lacks {', '.join(missing)}. "
            "Put the files of CompVis/stable-diffusion-safety-checker there, or turn safety_checker off "
            "in the preset."
        )
    return folder


def _load(models_root: Path) -> tuple[Any, Any]:
    folder = require_safety_checker(models_root)
    with _load_lock:
        if folder not in _loaded:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            checker = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True).eval()
            processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            _loaded[folder] = (checker, processor)
        return _loaded[folder]


def flag_images(models_root: Path, images: Sequence[Image.Image]) -> list[bool]:
    """True for each image the checker flags as not safe for work."""
    if not images:
        return []
    import numpy as np
    import torch

    checker, processor = _load(models_root)
    rgb = [image.convert("RGB") for image in images]
    pixels = processor(images=rgb, return_tensors="pt").pixel_values.to(checker.dtype)
    flagged: list[bool] = []
    with torch.no_grad():
        for index, image in enumerate(rgb):  # one at a time: the images may differ in size
            array = np.asarray(image, dtype=np.float32)[None] / 255.0
            _, result = checker(images=array, clip_input=pixels[index : index + 1])
            flagged.append(bool(result[0]))
    return flagged


def mark_held_back(infotext: str) -> str:
    """The infotext of a held-back image: A1111's parameter line gains ``Safety checker: held back``."""
    return f"{infotext}, {HELD_BACK}" if infotext else HELD_BACK


def worker_screen(models_root: Path) -> Any:
    """For a worker: a function flagging one image (the checker's files are required up front, so a
    job asking for screening fails with the reason rather than passing pictures unscreened)."""
    require_safety_checker(models_root)
    return lambda image: flag_images(models_root, [image])[0]


def screen_files(models_root: Path, paths: Sequence[str | Path]) -> list[bool]:
    """Which image files were held back: those the worker marked (see the module docstring), and any
    other the checker flags now, which is replaced (atomically) by a black image of its size."""
    from PIL import Image

    images = []
    marked = []
    for path in paths:
        with Image.open(path) as image:
            marked.append(HELD_BACK in str(image.info.get("parameters", "")))
            images.append(image.convert("RGB"))
    if all(marked):
        return marked
    flags = [
        True if was_marked else flag
        for was_marked, flag in zip(marked, flag_images(models_root, images), strict=True)
    ]
    for path, image, flagged, was_marked in zip(paths, images, flags, marked, strict=True):
        if flagged and not was_marked:
            target = Path(path)
            temp = target.with_name(f".{target.name}.screened")
            Image.new("RGB", image.size, "black").save(temp, format="PNG")
            os.replace(temp, target)
            log.info("safety checker held back %s", target.name)
    return flags
