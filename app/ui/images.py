"""Small image helpers shared by the tabs (no Gradio here)."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def encode_png(image: Image.Image) -> str:
    """Base64 PNG: how images travel inside a queued request (self-contained, survives restarts)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with transparency over white (what a user sees in the editor)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")
