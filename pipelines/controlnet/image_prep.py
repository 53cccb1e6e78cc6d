"""Small array helpers the preprocessors and the annotator networks share.

Images arrive as PIL images or arrays of any channel count; the detectors want uint8 H x W x 3,
and the annotator networks want the short side at the preprocessor resolution, edge-padded to
multiples of 64 (the ``sd-webui-controlnet`` extension's ``HWC3`` and ``resize_image_with_pad``).
numpy and OpenCV are imported inside the functions, so importing this module stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipelines.errors import ControlNetError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image


def hwc3(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3: grey is repeated, an alpha channel is composited over white (as the
    extension's ``HWC3``)."""
    import numpy as np

    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image] * 3, axis=2)
    if channels in (2, 4):
        color = image[:, :, :-1].astype(np.float32)
        if channels == 2:
            color = np.concatenate([color] * 3, axis=2)
        alpha = image[:, :, -1:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise ControlNetError(f"Control image has {channels} channels; use an RGB, RGBA or greyscale image.")


def resize_with_pad64(
    image: np.ndarray, resolution: int
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale so the short side is ``resolution``, then edge-pad to multiples of 64 (what the
    annotator networks want); returns the image and a function that crops a result back."""
    import cv2
    import numpy as np

    image = hwc3(image)
    height, width = image.shape[:2]
    scale = float(resolution) / float(min(height, width))
    target_h, target_w = int(np.round(height * scale)), int(np.round(width * scale))
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    resized = cv2.resize(image, (target_w, target_h), interpolation=interpolation)
    pad_h, pad_w = -target_h % 64, -target_w % 64
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")

    def remove_pad(result: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(result[:target_h, :target_w])

    return np.ascontiguousarray(padded), remove_pad


def image_to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 pixels of a PIL image or array (palette and other modes converted first)."""
    import numpy as np

    if isinstance(image, np.ndarray):
        return hwc3(image)
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "P" else "RGB")
    return hwc3(np.asarray(image))
