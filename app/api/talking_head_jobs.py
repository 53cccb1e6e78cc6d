"""``mode: talking_head`` jobs over the API: the files arrive as base64 and are staged on disk.

The engine reads a portrait, a speech recording and optional reference videos from files. A client
sends their contents (base64, bare or as a ``data:`` URL, like A1111's image fields); a string that
names a file instead is refused with 422, and the server never looks at such a path (not even to
see whether it exists), so no file of the server can be reached this way.

Each upload is decoded and checked before anything is queued (the portrait must decode as an image,
the speech as non-empty audio, the videos must not be empty), then written under
``<data_dir>/uploads/<random>/`` with names chosen here, and the job is queued with those paths.
See :mod:`app.uploads` for how long the files stay.
"""

from __future__ import annotations

import base64
import binascii
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.exceptions import RequestValidationError

from app.uploads import remove_folder

if TYPE_CHECKING:
    from app.api.context import ApiContext
    from app.api.schemas import TalkingHeadApiRequest
    from contract.talking_head import TalkingHeadRequest

# Portrait formats kept byte for byte (EXIF orientation included); anything else becomes a PNG.
KEPT_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
REFERENCE_VIDEOS = {"ref_eyeblink": "eyeblink-reference.video", "ref_pose": "pose-reference.video"}
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\s]*")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_SEND_BASE64 = "Send the file's contents as base64 (a data: URL or bare base64)"


class UploadFieldError(ValueError):
    """One uploaded field cannot be used; becomes a 422 that names ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def looks_like_path(text: str) -> bool:
    """True for what a client may send by mistake instead of a file's contents: a path or file URL."""
    text = text.strip()
    if text.startswith("data:"):
        return False
    if text.startswith(("file:", "~", "./", "../", ".\\", "..\\", "\\")) or _WINDOWS_DRIVE.match(text):
        return True
    # Base64 has "/" but never ".", "\" or ":"; "/9j/4AAQ..." (a JPEG) must not count as a path.
    return not _BASE64_TEXT.fullmatch(text) and any(mark in text for mark in "/\\")


def decode_upload(value: Any, *, field: str) -> bytes:
    """The bytes of a base64 upload (bare or ``data:...;base64,``); never reads a file."""
    if not isinstance(value, str) or not value.strip():
        raise UploadFieldError(field, f"expected a file. {_SEND_BASE64}.")
    path_refused = UploadFieldError(
        field,
        "file paths are not accepted over the API (the server opens no file a client names). "
        f"{_SEND_BASE64}.",
    )
    if looks_like_path(value):
        raise path_refused
    text = value.strip()
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise UploadFieldError(field, f"the data: URL is not base64 ('{header[:40]}'). {_SEND_BASE64}.")
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        if "/" in text:  # "/etc/hostname" is made of base64 characters, but is no base64
            raise path_refused from None
        raise UploadFieldError(field, f"not base64 data ('{text[:40]}...'). {_SEND_BASE64}.") from None
    if not raw:
        raise UploadFieldError(field, "the file is empty (0 bytes).")
    return raw


def stage_portrait(value: Any, folder: Path) -> Path:
    """Check the portrait decodes as an image and write it into ``folder``."""
    from PIL import ImageOps

    from app.api.images import decode_base64_image
    from pipelines.generation.image_ops import ImageInputError

    raw = decode_upload(value, field="image")
    try:
        image = decode_base64_image(value, field="image")  # the studio's image checks, by field
    except ImageInputError as exc:
        raise UploadFieldError("image", str(exc).removeprefix("image: ")) from None
    kept = KEPT_IMAGE_FORMATS.get(image.format or "")
    if kept is not None:
        path = folder / f"portrait.{kept}"
        path.write_bytes(raw)
        return path
    path = folder / "portrait.png"
    converted = ImageOps.exif_transpose(image)
    converted.convert("RGBA" if "A" in converted.getbands() else "RGB").save(path, format="PNG")
    return path


def stage_audio(value: Any, folder: Path) -> Path:
    """Write the speech into ``folder`` and check ffmpeg decodes at least one video frame of it."""
    from sadtalker.audio_io import load_audio
    from sadtalker.errors import AudioFileError

    path = folder / "speech.audio"  # ffmpeg tells the format from the contents
    path.write_bytes(decode_upload(value, field="audio"))
    check_speech_length(probe_audio_seconds(path))  # before decoding: a small file can hold hours
    try:
        decoded = load_audio(path)
    except AudioFileError as exc:
        # The messages name the file; here that is our copy, which the client never saw.
        message = str(exc).replace(str(path), "the upload").replace(f"Audio file {path.name}", "The file")
        message = message.replace(path.name, "The file")
        raise UploadFieldError("audio", message) from None
    check_speech_length(decoded.duration)  # containers whose header gave no duration
    return path


_DURATION = re.compile(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")


def probe_audio_seconds(path: Path) -> float | None:
    """The length ffmpeg reads from the file's header, without decoding it (None: not stated)."""
    from sadtalker.ffmpeg import ffmpeg_executable

    completed = subprocess.run(
        [ffmpeg_executable(), "-nostdin", "-hide_banner", "-i", str(path)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    match = _DURATION.search(completed.stderr.decode("utf-8", errors="replace"))
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def check_speech_length(seconds: float | None) -> None:
    """UploadFieldError (422 on ``audio``) when the speech is longer than the memory budget allows."""
    from contract.budget import BudgetExceededError, check_audio_seconds

    if seconds is None:
        return
    try:
        check_audio_seconds("audio", seconds)
    except BudgetExceededError as exc:
        raise UploadFieldError("audio", str(exc).removeprefix("audio: ")) from None


def stage_talking_head_request(body: TalkingHeadApiRequest, folder: Path) -> TalkingHeadRequest:
    """The engine's request for ``body``, its files decoded and checked into ``folder``."""
    from contract.talking_head import TalkingHeadRequest

    fields = body.model_dump(exclude={"image", "audio", *REFERENCE_VIDEOS})
    fields["image"] = stage_portrait(body.image, folder)
    fields["audio"] = stage_audio(body.audio, folder)
    staged: dict[str, Path] = {}  # the same video sent twice is written once
    for field, name in REFERENCE_VIDEOS.items():
        value = getattr(body, field)
        if value is None:
            continue
        if value not in staged:
            path = folder / name
            path.write_bytes(decode_upload(value, field=field))
            staged[value] = path
        fields[field] = staged[value]
    return TalkingHeadRequest.model_validate(fields)


def submit_talking_head_job(context: ApiContext, body: TalkingHeadApiRequest, owner: str) -> str:
    """Stage ``body``'s files and queue the job; 422 (naming the field) when a file is unusable.

    Runs in a worker thread: decoding and writing megabytes must not block the event loop.
    """
    uploads = context.services.uploads
    queue = context.queue
    with uploads.lock:
        uploads.prune(queue.store.active_requests(kind="talking_head"))
        folder = uploads.new_folder()
        try:
            request = stage_talking_head_request(body, folder)
            return queue.submit(request, owner=owner)
        except UploadFieldError as exc:
            remove_folder(folder)
            raise RequestValidationError(
                [{"loc": ("body", exc.field), "msg": exc.message, "type": "value_error"}]
            ) from None
        except BaseException:
            remove_folder(folder)
            raise
