"""The talking head's background enhancer: one of the studio's upscalers run over every frame.

The reference's ``--background_enhancer realesrgan`` hands Real-ESRGAN to GFPGAN as its
``bg_upsampler``: the whole frame is upscaled by the model's factor, resized to the output scale, and
the restored faces are pasted over it, so the upscaler only shows outside the face. Here the
upscaler is any model file the studio lists in ``models/ESRGAN`` (or A1111's other upscaler folders,
``RealESRGAN``, ``SwinIR``, ``DAT``), loaded by spandrel through ``pipelines.postprocess.upscalers``;
each frame goes through it at the model's own factor and back to the frame's size (Lanczos), and the
engine then runs the face enhancer, when one is chosen, on that frame: the restored face covers the
face region and the upscaled pixels remain around it. Without a face enhancer the whole frame is
enhanced.

Only names the studio lists are accepted (never a path), so an API client cannot make the server
read a file of its choosing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sadtalker.errors import SadTalkerError

if TYPE_CHECKING:
    import torch

    from pipelines.postprocess.upscalers import UpscalerCache

FIELD = "background_enhancer"
FrameEnhancer = Callable[[np.ndarray], np.ndarray]


def find_background_upscaler(models_dir: Path, name: str) -> Path:
    """The model file of the upscaler called ``name`` (listed name, file name or stem, any case).

    Built-in resizes (Lanczos, ...) and the Stable Diffusion x4 upscaler are not background
    enhancers: the first adds nothing, the second needs a prompt and takes minutes per frame.
    """
    from pipelines.postprocess.upscalers import UPSCALER_FOLDERS, list_upscalers

    candidates = [
        (info.name, info.path)
        for info in list_upscalers(models_dir)
        if info.kind in UPSCALER_FOLDERS and info.path is not None
    ]
    wanted = name.strip()
    for matches in (
        lambda listed, path: listed == wanted,
        lambda listed, path: listed.lower() == wanted.lower(),
        lambda listed, path: path.name.lower() == wanted.lower(),
        lambda listed, path: path.stem.lower() == wanted.lower(),
    ):
        for listed, path in candidates:
            if matches(listed, path):
                return path
    folder = Path(models_dir) / "ESRGAN"
    installed = ", ".join(listed for listed, _ in candidates) or "none installed"
    raise SadTalkerError(
        f"{FIELD}: there is no upscaler named '{name}' in {folder} (installed: {installed}). Put an "
        f"ESRGAN/Real-ESRGAN model (.safetensors or .pth) in {folder} and use its file name, or leave "
        f"{FIELD} empty."
    )


def load_background_enhancer(
    models_dir: Path,
    name: str,
    *,
    cache: UpscalerCache | None = None,
    device: torch.device | str | None = None,
    tile: int = 512,
    tile_overlap: int = 32,
) -> FrameEnhancer:
    """``frame -> frame`` (RGB uint8, same size) running the upscaler ``name``; the model is loaded
    now, so a missing or unreadable file fails before any rendering."""
    from pipelines.postprocess.upscalers import UpscalerCache

    path = find_background_upscaler(models_dir, name)
    models = cache if cache is not None else UpscalerCache(1)
    descriptor = models.get(path, device=device)
    if descriptor.purpose == "FaceSR":
        raise SadTalkerError(
            f"{FIELD}: {path.name} is a face restoration model ({descriptor.architecture.name}), not an "
            "upscaler. Choose it as the face enhancer instead, or pick an ESRGAN model here."
        )

    def enhance(frame: np.ndarray) -> np.ndarray:
        from PIL import Image

        from pipelines.postprocess.upscalers import pil_to_tensor, run_image_model_tiled, tensor_to_pil

        height, width = frame.shape[:2]
        current = models.get(path, device=device)  # the cache may have dropped it between frames
        source = Image.fromarray(np.ascontiguousarray(frame)).convert("RGB")
        if current.input_channels == 1:
            source = source.convert("L")
        upscaled = tensor_to_pil(
            run_image_model_tiled(current, pil_to_tensor(source), tile=tile, tile_overlap=tile_overlap)
        ).convert("RGB")
        if upscaled.size != (width, height):
            upscaled = upscaled.resize((width, height), resample=Image.Resampling.LANCZOS)
        return np.asarray(upscaled, dtype=np.uint8)

    return enhance
