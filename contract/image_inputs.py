"""Every image a job is given is decoded once when the request is built, before it is queued.

Why here: the request models are built by the UI, the API, the CLI and the batch runner alike, so a
text file named ``.png``, a truncated download or a HEIC photo the decoder lacks is refused at
submit time, in the caller's vocabulary ("init_images.0: not an image file (text/plain)",
"init_images.0: file not found: nothere.png"), and never after a model has spent a minute loading.
Results are cached by content, because one request is validated more than once on its way to the
worker (UI, queue, worker).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

_CACHE_SIZE = 64
_cache: OrderedDict[bytes, str | None] = OrderedDict()
_cache_lock = threading.Lock()

HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}


class ImageFieldError(ValueError):
    """An image field holds something that is not a readable image; the message names the field."""


def describe_content(head: bytes) -> str:
    """What the bytes look like when they are not an image PIL reads: a MIME type or plain words."""
    if not head:
        return "an empty file"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in HEIF_BRANDS:
            return "image/heic"
        if brand in AVIF_BRANDS:
            return "image/avif"
        return "video/mp4"
    if head.startswith(b"%PDF"):
        return "application/pdf"
    if head.startswith(b"PK\x03\x04"):
        return "application/zip"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "text/html"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return "image/svg+xml"
    if b"\0" not in head[:4096]:
        try:
            head[:4096].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head[:4096]) - 4:  # not just a character cut at the end
                return "unknown binary data"
        return "text/plain"
    return "unknown binary data"


def _problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable image (None when it decodes completely)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Image.DecompressionBombError:
        return None  # the pixel budget reports it, with the limit (contract/budget.py)
    except UnidentifiedImageError:
        kind = describe_content(data[:8192])
        if kind in ("image/heic", "image/avif"):
            return (
                f"a {kind.split('/')[1].upper()} image, which this studio's decoder cannot read; "
                "save it as PNG or JPEG and try again"
            )
        if kind == "image/svg+xml":
            return "an SVG drawing, not a picture made of pixels; export it as PNG first"
        if kind == "text/html":
            return "not an image file (text/html: a web page, e.g. a download link that needed a login)"
        return f"not an image file ({kind})"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            return "the image file is truncated (an interrupted download?); fetch or export it again"
        return f"the image is damaged and cannot be decoded ({exc})"
    return None


def _cached_problem(data: bytes) -> str | None:
    key = hashlib.sha256(data).digest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    problem = _problem(data)
    with _cache_lock:
        _cache[key] = problem
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return problem


def _base64_payload(text: str) -> bytes | None:
    """The bytes of base64 text (bare or a ``data:`` URL); None when ``text`` is not base64."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    elif len(text) < 16 or re.fullmatch(r"[A-Za-z0-9+/=\s]*", text[:4096]) is None:
        return None
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def check_image_input(field: str, value: Any, *, read_files: bool = True) -> None:
    """Decode the image ``value`` (base64, a ``data:`` URL or a file path) and raise
    :class:`ImageFieldError` naming ``field`` when it is missing or not a readable image.

    ``read_files=False`` (the REST API) leaves file paths alone: a client may never make the
    server open a path, and the API refuses them itself."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return
    text = value.strip()
    data = _base64_payload(text)
    if data is not None and read_files and not text.startswith("data:") and _is_file(text):
        data = None  # a file whose name happens to read as base64
    if data is None and text.startswith("data:"):
        raise ImageFieldError(f"{field}: the data: URL does not hold base64 image data")
    if data is None:
        if not read_files:
            return
        data = _read_image_file(field, text)
    problem = _cached_problem(data)
    if problem is not None:
        raise ImageFieldError(f"{field}: {problem}")


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):
        return False


def _read_image_file(field: str, text: str) -> bytes:
    path = Path(text)
    try:
        exists, folder = path.exists(), path.is_dir()
    except (OSError, ValueError):  # e.g. a NUL character or an over-long name
        raise ImageFieldError(f"{field}: neither a file name nor base64 image data") from None
    if not exists:
        raise ImageFieldError(f"{field}: file not found: {text}")
    if folder:
        raise ImageFieldError(f"{field}: {text} is a folder, not an image file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageFieldError(f"{field}: cannot read {text} ({exc.strerror or exc})") from None
