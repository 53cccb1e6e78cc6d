"""Image plumbing for the image modes: decoding inputs, A1111's resize modes, masks, crops, paste-back.

All functions are pure PIL/numpy and keep A1111's semantics so users get the results they know:
resize modes 0-3, white-means-change masks, ``mask_blur``, "only masked" crop regions with padding,
and a final composite that leaves every pixel outside the mask exactly as it was.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from pipelines.errors import StudioError

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")


class ImageInputError(StudioError):
    """An input that should be an image is not one (or cannot be read)."""


def load_image(source: str | Path | Image.Image | bytes, *, field: str = "image") -> Image.Image:
    """Decode an image given as a PIL image, raw bytes, a file path, or base64 (with or without a
    ``data:image/...;base64,`` prefix, as A1111's API accepts)."""
    if isinstance(source, Image.Image):
        return source
    data: bytes | None = None
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, Path) or (isinstance(source, str) and len(source) < 4096 and _is_file(source)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageInputError(f"{field}: cannot read {source} ({exc.strerror}).") from exc
    elif isinstance(source, str):
        text = source.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError(
                f"{field}: not an image file path and not base64 image data ('{source[:40]}...')."
            ) from None
    if not data:
        raise ImageInputError(f"{field}: empty image data.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageInputError(f"{field}: not a readable image ({exc.__class__.__name__}).") from exc
    return ImageOps.exif_transpose(image)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas composited on black (A1111 flattens the same way)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's ``resize_image``: 0 just resize, 1 crop and resize, 2 resize and fill, 3 = 0 here
    (the latent-upscale variant is handled by the caller in latent space)."""
    if mode in (0, 3):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:
        scale_w = width if ratio > src_ratio else image.width * height // image.height
        scale_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = image.resize((scale_w, scale_h), Image.Resampling.LANCZOS)
        canvas = Image.new(image.mode, (width, height))
        canvas.paste(resized, box=(width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        return canvas
    if mode == 2:
        scale_w = width if ratio < src_ratio else image.width * height // image.height
        scale_h = height if ratio >= src_ratio else image.height * width // image.width
        resized = image.resize((scale_w, scale_h), Image.Resampling.LANCZOS)
        canvas = Image.new(image.mode, (width, height))
        canvas.paste(resized, box=(width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        if ratio < src_ratio:
            fill = height // 2 - scale_h // 2
            if fill > 0:
                canvas.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                canvas.paste(
                    resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                    box=(0, fill + scale_h),
                )
        elif ratio > src_ratio:
            fill = width // 2 - scale_w // 2
            if fill > 0:
                canvas.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                canvas.paste(
                    resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                    box=(fill + scale_w, 0),
                )
        return canvas
    raise ValueError(f"resize_mode: {mode} is not one of 0-3 ({', '.join(RESIZE_MODES)})")


@dataclass(frozen=True)
class PreparedMask:
    mask: Image.Image  # "L", same size as the image, 255 = change
    notes: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return self.mask.getbbox() is None


def prepare_mask(
    mask: Image.Image, size: tuple[int, int], *, invert: bool = False, blur_x: int = 4, blur_y: int = 4
) -> PreparedMask:
    """Greyscale, same size as the image (resized with a note if not), optionally inverted and
    blurred the way A1111 blurs (separable Gaussian with A1111's kernel sizes)."""
    notes: list[str] = []
    if mask.mode in ("RGBA", "LA"):
        # A painted mask from a sketch layer: alpha marks the painted area.
        mask = mask.getchannel("A")
    mask = mask.convert("L")
    if mask.size != size:
        notes.append(f"mask was {mask.width}x{mask.height}; resized to the image's {size[0]}x{size[1]}")
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    if blur_x > 0 or blur_y > 0:
        array = np.array(mask)
        import cv2

        if blur_x > 0:
            kernel = 2 * int(2.5 * blur_x + 0.5) + 1
            array = cv2.GaussianBlur(array, (kernel, 1), blur_x)
        if blur_y > 0:
            kernel = 2 * int(2.5 * blur_y + 0.5) + 1
            array = cv2.GaussianBlur(array, (1, kernel), blur_y)
        mask = Image.fromarray(array)
    return PreparedMask(mask=mask, notes=tuple(notes))


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """Bounding box of the masked area, padded (A1111's ``get_crop_region``)."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return 0, 0, mask.width, mask.height
    x1, y1, x2, y2 = box
    return (
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, mask.width),
        min(y2 + padding, mask.height),
    )


def expand_to_aspect(
    box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int
) -> tuple[int, int, int, int]:
    """Grow a crop box to the processing aspect ratio, staying inside the image
    (A1111's ``expand_crop_region``)."""
    x1, y1, x2, y2 = box
    ratio_crop = (x2 - x1) / max(1, y2 - y1)
    ratio_target = width / height
    if ratio_crop > ratio_target:
        desired_h = (x2 - x1) / ratio_target
        diff = int(desired_h - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= image_h:
            y1 -= y2 - image_h
            y2 = image_h
        if y1 < 0:
            y2 -= y1
            y1 = 0
        y2 = min(y2, image_h)
    else:
        desired_w = (y2 - y1) * ratio_target
        diff = int(desired_w - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= image_w:
            x1 -= x2 - image_w
            x2 = image_w
        if x1 < 0:
            x2 -= x1
            x1 = 0
        x2 = min(x2, image_w)
    return x1, y1, x2, y2


def fill_masked_area(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" for inpainting: replace the masked area with blurred surrounding colours."""
    rgb = np.array(image.convert("RGB")).astype(np.float32)
    keep = (np.array(mask) < 128).astype(np.float32)[..., None]
    import cv2

    result = rgb * keep
    weight = keep.copy()
    for radius in (256, 64, 16, 4, 2, 1):
        blurred = cv2.blur(result, (radius * 2 + 1, radius * 2 + 1))
        blurred_weight = cv2.blur(weight, (radius * 2 + 1, radius * 2 + 1))[..., None]
        filled = blurred / np.maximum(blurred_weight, 1e-6)
        has = blurred_weight > 1e-6
        result = np.where(weight > 0, result, np.where(has, filled, result))
        weight = np.maximum(weight, has.astype(np.float32))
    out = np.where(keep > 0, rgb, result)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def composite_onto(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste ``generated`` over ``original`` through ``mask`` (255 = generated). Where the mask
    is 0 the original's pixels come back unchanged, bit for bit."""
    base = to_rgb(original)
    if generated.size != base.size:
        generated = generated.resize(base.size, Image.Resampling.LANCZOS)
    return Image.composite(generated.convert("RGB"), base, mask.convert("L"))


def extend_canvas(
    image: Image.Image, *, left: int = 0, right: int = 0, up: int = 0, down: int = 0, mask_overlap: int = 8
) -> tuple[Image.Image, Image.Image]:
    """Outpainting: a larger canvas with the image in place, the new margins pre-filled with its
    stretched edge colours, and a mask (255 = new area, grown ``mask_overlap`` px into the image so
    the seam is repainted)."""
    image = to_rgb(image)
    width, height = image.width + left + right, image.height + up + down
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (left, up))
    mask = Image.new("L", (width, height), 255)
    inner = (
        left + (mask_overlap if left else 0),
        up + (mask_overlap if up else 0),
        left + image.width - (mask_overlap if right else 0),
        up + image.height - (mask_overlap if down else 0),
    )
    mask.paste(0, inner)
    keep = (left, up, left + image.width, up + image.height)
    filled = fill_masked_area(canvas, _hard_mask(width, height, keep))
    return filled, mask


def _hard_mask(width: int, height: int, keep_box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, keep_box)
    return mask


def soften(mask: Image.Image, radius: float) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask
