"""Images sent to the API: base64 only, checked before a job is queued.

The engine's ``load_image`` also accepts file paths (the CLI needs them); over HTTP that would let
a client make the server read its own files, so every image field of an API request must be
base64 (with or without a ``data:`` prefix), is decoded once here to report a bad one by field
name with 422, and is passed on as a ``data:`` URL, which the engine never takes for a path.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any

from pipelines.generation.image_ops import ImageInputError

if TYPE_CHECKING:
    from PIL import Image


def decode_base64_image(text: Any, *, field: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text.strip():
        raise ImageInputError(f"{field}: expected a base64-encoded image.")
    data = text.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{field}: not base64 image data ('{text[:40]}...').") from None
    if not raw:
        raise ImageInputError(f"{field}: empty image data.")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.DecompressionBombError:
        raise ImageInputError(f"{field}: the image has too many pixels to process safely.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"{field}: not a readable image ({exc.__class__.__name__}).") from None
    return image


def as_data_url(text: Any, *, field: str) -> str:
    """Check ``text`` decodes to an image and return it as a ``data:`` URL."""
    decode_base64_image(text, field=field)
    stripped = str(text).strip()
    if stripped.startswith("data:"):
        stripped = stripped.partition(",")[2]
    return "data:image/png;base64," + "".join(stripped.split())


def sanitise_request_images(payload: dict[str, Any]) -> dict[str, Any]:
    """Return ``payload`` with every image field checked and turned into a ``data:`` URL."""
    payload = dict(payload)
    if isinstance(payload.get("init_images"), list):
        payload["init_images"] = [
            as_data_url(image, field=f"init_images.{index}")
            for index, image in enumerate(payload["init_images"])
        ]
    if payload.get("mask"):
        payload["mask"] = as_data_url(payload["mask"], field="mask")
    if payload.get("mode") == "extras" or payload.get("image"):
        payload["image"] = as_data_url(payload.get("image"), field="image")
    units = payload.get("controlnet_units")
    if isinstance(units, list):
        payload["controlnet_units"] = [_sanitise_unit(unit, index) for index, unit in enumerate(units)]
    return payload


def _sanitise_unit(unit: Any, index: int) -> Any:
    if not isinstance(unit, dict):
        return unit
    unit = dict(unit)
    for key in ("image", "mask"):
        if unit.get(key):
            unit[key] = as_data_url(unit[key], field=f"controlnet_units.{index}.{key}")
    return unit
