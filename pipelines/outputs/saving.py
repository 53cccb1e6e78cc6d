"""Write generation results to disk the way A1111 lays them out, without ever exposing half a file.

* Folders: ``outputs/<mode>-images/YYYY-MM-DD/`` (``txt2img-images``, ``img2img-images``,
  ``extras-images``), as A1111 does.
* Names: ``NNNNN-<seed>.png``; the 5-digit counter continues from the highest number already in
  the folder (A1111's ``get_next_sequence_number``), so our files interleave with A1111's.
* Metadata: the infotext goes into the PNG ``parameters`` text chunk, or into EXIF UserComment for
  JPEG/WebP, where A1111 and every A1111-aware tool (Civitai, PNG-info tabs) look for it.
* Atomicity: bytes go to a hidden temp file in the same folder, are fsynced, then ``os.replace``d
  onto the final name, so a reader or a crash never sees a partial image.

Picking the counter safely across threads and processes: a writer first claims the *number* by
creating a hidden marker ``.NNNNN.reserved`` with ``O_CREAT | O_EXCL`` (the file system makes
exactly one creator win), then checks that no finished file already carries that number (a
previous holder of the marker may have finished and released it), and only then writes. The
marker is removed once the image is in place, or on any failure. Claiming the number rather than
the final name matters because two saves with different seeds have different final names but
must still get different numbers.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "atomic_write_bytes",
    "dated_output_dir",
    "encode_image",
    "read_png_parameters",
    "save_image_atomically",
]

_COUNTER_RE = re.compile(r"^(\d+)(?:[-.]|$)")
_MARKER_RE = re.compile(r"^\.(\d+)\.reserved$")
_MODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
# A1111's default "jpeg_quality" setting, used for both JPEG and WebP.
_LOSSY_QUALITY = 80
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_MAX_TEMP_ATTEMPTS = 100


def dated_output_dir(
    outputs_root: Path, mode: str, when: datetime | None = None, *, kind: str = "images"
) -> Path:
    """``outputs_root / f"{mode}-{kind}" / "YYYY-MM-DD"`` (local date, like A1111; ``kind`` is
    "images" or "grids")."""
    if not _MODE_RE.match(mode) or kind not in ("images", "grids"):
        raise ValueError(f"mode {mode!r} is not a plain name such as 'txt2img', 'img2img' or 'extras'")
    day = (when or datetime.now()).strftime("%Y-%m-%d")
    return Path(outputs_root) / f"{mode}-{kind}" / day


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable. Windows cannot open directories; some file systems refuse."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_exclusive(path: Path) -> int:
    """Create ``path`` only if it does not exist; file mode follows the umask (unlike mkstemp's 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o666)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The parent folder is created. The temp file sits next to ``path`` (``os.replace`` is only atomic
    within one file system) and is removed if anything fails. On Windows the rename is retried for a
    few seconds while another program (an image viewer, antivirus) briefly locks ``path``.
    """
    from pipelines.outputs.windows_files import replace_with_retry

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(_MAX_TEMP_ATTEMPTS):
        temp_path = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = _create_exclusive(temp_path)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"could not create a temporary file next to {path}; check the folder")

    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace_with_retry(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _user_comment(text: str) -> bytes:
    """EXIF UserComment payload as A1111 (piexif) writes it: "UNICODE\\0" + UTF-16-BE."""
    return _UNICODE_PREFIX + text.encode("utf-16-be")


def _decode_user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw or None
    if raw.startswith(_UNICODE_PREFIX):
        body = raw[len(_UNICODE_PREFIX) :]
        if body.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = body.decode("utf-16", errors="replace")
        else:
            text = body.decode("utf-16-be", errors="replace")
    elif raw.startswith(_ASCII_PREFIX):
        text = raw[len(_ASCII_PREFIX) :].decode("ascii", errors="replace")
    else:
        # A1111's fallback for unknown or missing encodings ("\0" * 8 included).
        text = (
            raw[8:].decode("utf-8", errors="ignore")
            if raw[:8] == b"\x00" * 8
            else raw.decode("utf-8", "ignore")
        )
    text = text.rstrip("\x00")
    return text or None


def encode_image(image: Image.Image, extension: str, infotext: str | None) -> bytes:
    """Encode ``image`` as png/jpg/jpeg/webp bytes with ``infotext`` embedded as A1111 does."""
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    fmt = _FORMATS.get(extension.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"extension {extension!r} is not supported; use one of: {', '.join(_FORMATS)}")
    buffer = io.BytesIO()
    if fmt == "PNG":
        pnginfo = None
        if infotext:
            pnginfo = PngInfo()
            # add_text stores non-Latin-1 text (CJK prompts) as an iTXt chunk by itself.
            pnginfo.add_text("parameters", infotext)
        image.save(buffer, format="PNG", pnginfo=pnginfo)
    else:
        if fmt == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        options: dict[str, object] = {"quality": _LOSSY_QUALITY}
        if infotext:
            exif = PILImage.Exif()
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(infotext)
            options["exif"] = exif.tobytes()
        image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _numbers_in(directory: Path) -> tuple[set[int], set[int]]:
    """(counters of finished files, counters held by reservation markers) in ``directory``."""
    finished: set[int] = set()
    reserved: set[int] = set()
    with os.scandir(directory) as entries:
        for entry in entries:
            marker = _MARKER_RE.match(entry.name)
            if marker is not None:
                reserved.add(int(marker.group(1)))
                continue
            if entry.name.startswith("."):
                continue
            counter = _COUNTER_RE.match(entry.name)
            if counter is not None:
                finished.add(int(counter.group(1)))
    return finished, reserved


def _reserve_counter(directory: Path) -> tuple[int, Path]:
    """Claim the next free counter; return it and its marker (the caller must remove the marker)."""
    finished, reserved = _numbers_in(directory)
    candidate = max(finished | reserved, default=-1) + 1
    while True:
        marker = directory / f".{candidate:05d}.reserved"
        try:
            os.close(_create_exclusive(marker))
        except FileExistsError:
            candidate += 1
            continue
        finished, _ = _numbers_in(directory)
        if candidate not in finished:
            return candidate, marker
        # A former holder of this marker finished and released it before we claimed it.
        marker.unlink(missing_ok=True)
        candidate = max(max(finished) + 1, candidate + 1)


def save_image_atomically(
    image: Image.Image,
    directory: Path,
    *,
    seed: int,
    infotext: str,
    extension: str = "png",
) -> Path:
    """Save ``image`` as ``directory/NNNNN-<seed>.<extension>`` and return the path.

    The image is encoded in memory first, so an encoder error touches nothing on disk.
    """
    extension = extension.lower().lstrip(".")
    return save_encoded_atomically(
        encode_image(image, extension, infotext), directory, seed=seed, extension=extension
    )


def save_encoded_atomically(data: bytes, directory: Path, *, seed: int, extension: str = "png") -> Path:
    """Write already encoded image bytes as ``directory/NNNNN-<seed>.<extension>``; return the path.

    The folder is created if needed; any failure removes the temp file and the counter reservation.
    The head writes a worker's image artifacts through here, so they get exactly the names an
    in-process job would.
    """
    extension = extension.lower().lstrip(".")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counter, marker = _reserve_counter(directory)
    try:
        path = directory / f"{counter:05d}-{int(seed)}.{extension}"
        atomic_write_bytes(path, data)
    finally:
        marker.unlink(missing_ok=True)
    return path


class ImageSink(Protocol):
    """Where the engine puts a finished image; returns a reference to it (a path, or an artifact
    ref when the image travels to the head first)."""

    def save_image(
        self, image: Image.Image, *, folder: str, seed: int, infotext: str, kind: str = "images"
    ) -> str: ...


@dataclass(frozen=True)
class DiskImageSink:
    """Saves into ``outputs_root/<folder>-<kind>/YYYY-MM-DD/`` (in-process jobs and the CLI)."""

    outputs_root: Path

    def save_image(
        self, image: Image.Image, *, folder: str, seed: int, infotext: str, kind: str = "images"
    ) -> str:
        directory = dated_output_dir(self.outputs_root, folder, kind=kind)
        return str(save_image_atomically(image, directory, seed=seed, infotext=infotext))


def read_png_parameters(path_or_image: Path | str | Image.Image) -> str | None:
    """The infotext stored in an image: PNG ``parameters`` text, else EXIF UserComment, else None."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if isinstance(path_or_image, PILImage.Image):
        return _parameters_from(path_or_image)
    try:
        with PILImage.open(path_or_image) as image:
            return _parameters_from(image)
    except UnidentifiedImageError as exc:
        raise ValueError(
            f"{path_or_image} is not an image that can be read; pick a PNG, JPEG or WebP file"
        ) from exc


def _parameters_from(image: Image.Image) -> str | None:
    text_chunks = getattr(image, "text", None)  # PNG: loads text chunks placed after the pixels too
    if isinstance(text_chunks, dict) and isinstance(text_chunks.get("parameters"), str):
        return text_chunks["parameters"]
    value = image.info.get("parameters")
    if isinstance(value, str):
        return value
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, (bytes, str)) and raw:
        return _decode_user_comment(raw)
    return None
