"""The memory budget every job is checked against when it is submitted, not discovered by the kernel.

A request whose output or intermediate image would not fit is refused by the request model itself
(so the UI, the REST API, the CLI and batch files all get the same answer, a 422 over HTTP), before
anything is queued or allocated. The budget is a number of pixels per image:

* ``SDSTUDIO_MAX_PIXELS`` (or ``--max-pixels``, which the app writes into that variable so worker
  processes inherit it) sets it explicitly;
* otherwise it is derived from the machine: half the physical RAM at :data:`RAM_BYTES_PER_PIXEL`
  bytes a pixel, and, when torch is already imported and CUDA is available, no more than the GPU's
  memory at :data:`VRAM_BYTES_PER_PIXEL` bytes a pixel. Validation never imports torch: RAM comes
  from ``os.sysconf`` or ``/proc/meminfo``.

Images given to a request (init images, masks, extras input, portraits) are measured from their
header only (PIL opens lazily and decodes nothing), so checking a 12000x12000 PNG costs kilobytes.
Talking-head audio is measured from a WAV header when it is one; other formats are checked where
they are decoded (the API measures them with ffmpeg before decoding).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import math
import os
import re
import struct
import sys
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_PIXELS_ENV = "SDSTUDIO_MAX_PIXELS"
RAM_SHARE = 0.5
"""Share of physical RAM one image may take: the rest is the OS, the loaded models and other jobs."""
RAM_BYTES_PER_PIXEL = 48
"""What one output pixel costs in RAM at the peak of a job: the RGB image (3 B), float32 tensors of
it on the way in and out of a model (12 B each), the PNG encoder's buffers and a resize's copy."""
VRAM_BYTES_PER_PIXEL = 24
"""What one pixel costs on the GPU: a half/float image tensor plus the upscaler's output buffer."""
MIN_DEFAULT_PIXELS = 4096 * 4096
"""The derived budget never goes below this (a 4x upscale of a 1024x1024 image), however small the
machine: such a job is what the studio is for, and a machine that cannot hold it fails elsewhere."""
AUDIO_BYTES_PER_SECOND = 512 * 1024
"""What one second of talking-head speech costs in RAM: the decoded 16 kHz samples and their WAV
copy, 25 frames of mel windows and face coefficients, with a safety factor of two."""
HEADER_PREFIX_CHARS = 256 * 1024
"""Base64 characters decoded to find an image's size (its header is almost always within them)."""
MAX_SECONDS_ENV = "SDSTUDIO_MAX_AUDIO_SECONDS"

_local_files_readable: ContextVar[bool] = ContextVar("sdstudio_local_files_readable", default=True)


@dataclass(frozen=True)
class MemoryBudget:
    """The limit in force, and where it came from (for the error message)."""

    max_pixels: int
    source: str

    @property
    def max_audio_seconds(self) -> float:
        """Longest talking-head speech: an explicit ``SDSTUDIO_MAX_AUDIO_SECONDS``, else the same
        bytes as the pixel budget, spent on audio."""
        explicit = _positive_number(os.environ.get(MAX_SECONDS_ENV))
        if explicit is not None:
            return explicit
        return self.max_pixels * RAM_BYTES_PER_PIXEL / AUDIO_BYTES_PER_SECOND

    def describe(self) -> str:
        side = int(math.sqrt(self.max_pixels))
        return f"{self.max_pixels / 1e6:.1f} megapixels (about {side}x{side}; {self.source})"


class BudgetExceededError(ValueError):
    """A request would need more memory than the budget; the message names the field and the limit."""


def physical_ram_bytes() -> int | None:
    """Total RAM from ``os.sysconf`` (POSIX) or ``/proc/meminfo``; None when neither answers."""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return int(pages * page_size)
    with contextlib.suppress(OSError, ValueError):
        match = re.search(r"^MemTotal:\s+(\d+)\s*kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    return None


@functools.lru_cache(maxsize=1)
def _cuda_total_bytes() -> int | None:
    """The first GPU's memory, only when torch is already imported (validation never imports it)."""
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:
        return None


def derived_max_pixels() -> MemoryBudget:
    """The budget this machine's memory gives (see the module docstring)."""
    ram = physical_ram_bytes()
    if ram is None:
        return MemoryBudget(MIN_DEFAULT_PIXELS, "RAM unknown: the minimum budget")
    pixels = int(ram * RAM_SHARE / RAM_BYTES_PER_PIXEL)
    source = f"derived from {ram / 2**30:.1f} GB RAM"
    vram = _cuda_total_bytes()
    if vram is not None and vram // VRAM_BYTES_PER_PIXEL < pixels:
        pixels = vram // VRAM_BYTES_PER_PIXEL
        source = f"derived from {vram / 2**30:.1f} GB of GPU memory"
    if pixels < MIN_DEFAULT_PIXELS:
        return MemoryBudget(MIN_DEFAULT_PIXELS, f"the minimum budget; {source}")
    return MemoryBudget(pixels, source)


def current_budget() -> MemoryBudget:
    """``SDSTUDIO_MAX_PIXELS`` when set (a positive integer), else :func:`derived_max_pixels`."""
    explicit = _positive_number(os.environ.get(MAX_PIXELS_ENV))
    if explicit is not None:
        return MemoryBudget(int(explicit), f"set by --max-pixels / {MAX_PIXELS_ENV}")
    return derived_max_pixels()


def set_max_pixels(max_pixels: int | None) -> None:
    """Set (or with None, go back to deriving) the budget for this process and the worker processes
    it starts later: the value lives in the environment, which children inherit."""
    if max_pixels is None:
        os.environ.pop(MAX_PIXELS_ENV, None)
    else:
        if max_pixels <= 0:
            raise ValueError(f"--max-pixels: must be a positive number of pixels, not {max_pixels}")
        os.environ[MAX_PIXELS_ENV] = str(int(max_pixels))


def _positive_number(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text.strip().replace("_", ""))
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


# --- checks ----------------------------------------------------------------------------------------
def check_pixels(field: str, what: str, width: float, height: float) -> None:
    """BudgetExceededError naming ``field`` when a ``width`` x ``height`` image is over the budget."""
    pixels = float(width) * float(height)
    budget = current_budget()
    if pixels <= budget.max_pixels:
        return
    raise BudgetExceededError(
        f"{field}: {what} would be {int(width)}x{int(height)} ({pixels / 1e6:.1f} megapixels), over this "
        f"studio's memory budget of {budget.describe()}. Use a smaller size or factor, or raise the "
        f"budget with --max-pixels (or {MAX_PIXELS_ENV}) if this machine has the memory."
    )


def check_audio_seconds(field: str, seconds: float) -> None:
    budget = current_budget()
    limit = budget.max_audio_seconds
    if seconds <= limit:
        return
    raise BudgetExceededError(
        f"{field}: the speech is {seconds:.0f} s long, over this studio's limit of {limit:.0f} s "
        f"(from its memory budget of {budget.describe()}). Split the recording, or raise the limit with "
        f"{MAX_SECONDS_ENV}."
    )


def model_upscale_side_factor(factor: float, native_scale: int = 4) -> float:
    """How far a model upscaler grows the image before the final resize: it runs (at most three
    times, as A1111's does) until the image covers the wanted size, so a 4x model asked for 2x
    makes a 4x intermediate and asked for 8x a 16x one."""
    if factor <= 1:
        return 1.0
    passes = min(3, math.ceil(math.log(factor, native_scale) - 1e-9))
    return float(native_scale ** max(1, passes))


# --- reading sizes cheaply --------------------------------------------------------------------------
@contextlib.contextmanager
def local_files_unreadable() -> Iterator[None]:
    """Within this block, image and audio fields that name files are not opened to be measured: an HTTP
    client must never make the server open a path of its choosing (the API checks file content it
    was sent, as base64, and refuses paths on its own)."""
    token = _local_files_readable.set(False)
    try:
        yield
    finally:
        _local_files_readable.reset(token)


def local_files_readable() -> bool:
    return _local_files_readable.get()


class ImageTooLargeToOpen(Exception):  # noqa: N818 - a condition, not a failure of ours
    """PIL refuses to even open the image (over twice its own pixel limit)."""


def image_size(value: Any) -> tuple[int, int] | None:
    """Width and height of an image given as base64 (bare or ``data:`` URL) or as a file path, read
    from its header without decoding pixels. None when it cannot be told (the engine reports an
    unreadable image by name when it loads it). Raises :class:`ImageTooLargeToOpen` for images PIL
    refuses as decompression bombs."""
    if isinstance(value, Path):
        return _file_image_size(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.startswith("data:"):
        return _bytes_image_size(text.partition(",")[2])
    if _looks_like_base64(text):
        size = _bytes_image_size(text)
        if size is not None:
            return size
    return _file_image_size(Path(text))


def _looks_like_base64(text: str) -> bool:
    head = text[:4096]
    return len(text) >= 16 and re.fullmatch(r"[A-Za-z0-9+/=\s]*", head) is not None


def _bytes_image_size(encoded: str) -> tuple[int, int] | None:
    compact = "".join(encoded.split())
    prefix = compact[: HEADER_PREFIX_CHARS - HEADER_PREFIX_CHARS % 4]
    for chunk in (prefix, compact) if len(compact) > len(prefix) else (compact,):
        try:
            raw = base64.b64decode(chunk + "=" * (-len(chunk) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
        size = _open_size(io.BytesIO(raw))
        if size is not None:
            return size
    return None


def _file_image_size(path: Path) -> tuple[int, int] | None:
    if not local_files_readable():
        return None
    try:
        if not path.is_file():
            return None
    except (OSError, ValueError):
        return None
    return _open_size(path)


def _open_size(source: Any) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                return int(image.width), int(image.height)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeToOpen(str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError):
        return None


def checked_image_size(field: str, value: Any) -> tuple[int, int] | None:
    """:func:`image_size`, with the image itself decoded (a missing file, a text file named .png or a
    truncated download is refused naming ``field``), checked against the budget and
    against PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, ~89 megapixels), whichever
    is lower: an image given to a job is decoded whole, and only resized down from there, so pixels
    beyond that limit are a risk and never a benefit."""
    try:
        size = image_size(value)
    except ImageTooLargeToOpen:
        size = None
        too_large = True
    else:
        too_large = size is not None and size[0] * size[1] > _pil_limit()
    if too_large:
        shown = f"{size[0]}x{size[1]} " if size else ""
        raise BudgetExceededError(
            f"{field}: the image {shown}has more pixels than an input image may have "
            f"({_pil_limit() / 1e6:.1f} megapixels, PIL's decompression-bomb limit). Send a smaller "
            "image: it is resized to the job's size anyway."
        )
    if size is not None:
        check_pixels(field, "the image", *size)
    from contract.image_inputs import check_image_input

    check_image_input(field, value, read_files=local_files_readable())  # decoded whole, once
    return size


def _pil_limit() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 2**62)


def wav_duration_seconds(value: Any) -> float | None:
    """Seconds of audio in a RIFF/WAVE header (file path or base64); None when it is not a WAV or
    the header does not say (other formats are measured where they are decoded)."""
    if isinstance(value, str) and value.strip().startswith("data:"):
        encoded = value.strip().partition(",")[2]
        return _riff_duration(_decode_prefix(encoded), len(encoded) * 3 // 4)
    if isinstance(value, str) and _looks_like_base64(value.strip()):
        return _riff_duration(_decode_prefix(value.strip()), len(value.strip()) * 3 // 4)
    if not isinstance(value, (str, Path)) or not local_files_readable():
        return None
    path = Path(value)
    try:
        if not path.is_file():
            return None
        with path.open("rb") as handle:
            header = handle.read(64 * 1024)
        total = path.stat().st_size
    except (OSError, ValueError):
        return None
    return _riff_duration(header, total)


def _decode_prefix(encoded: str) -> bytes:
    compact = "".join(encoded[: 96 * 1024].split())
    compact = compact[: len(compact) - len(compact) % 4]
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _riff_duration(header: bytes, file_size: int | None) -> float | None:
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= len(header):
        chunk_id = header[position : position + 4]
        (size,) = struct.unpack_from("<I", header, position + 4)
        body = position + 8
        if chunk_id == b"fmt " and body + 12 <= len(header):
            (byte_rate,) = struct.unpack_from("<I", header, body + 8)
        elif chunk_id == b"data":
            if byte_rate <= 0:
                return None
            if size in (0, 0xFFFFFFFF) and file_size is not None:  # streamed: runs to the end
                size = max(0, file_size - body)
            return size / byte_rate
        position = body + size + (size & 1)
    return None
