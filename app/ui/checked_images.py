"""Image inputs that say what is wrong with an upload instead of a bare "Error".

Gradio decodes an uploaded picture before our event handler runs; a text file named ``.png``, a
truncated download or a HEIC photo the decoder lacks then fails inside Gradio, and the page shows
"Error" while the reason goes to the console. These components catch that failure and hand the
handler an :class:`UnreadableUpload` naming the field and the problem, which the handler raises as
a user error, so the message appears under the Generate button (and in the toast) like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

log = logging.getLogger(__name__)

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # PIL's UnidentifiedImageError is an OSError


@dataclass(frozen=True)
class UnreadableUpload:
    """What a checked image input passes on when the upload is not a readable picture."""

    message: str


def describe_upload(field: str, payload: Any) -> str:
    """The message for an upload Gradio could not decode, in the words of the request contract."""
    from contract.image_inputs import ImageFieldError, check_image_input

    path = _payload_path(payload)
    name = _payload_name(payload) or (Path(path).name if path else "the upload")
    if path is None:
        return f"{field}: the upload could not be read; upload the picture again."
    try:
        check_image_input(field, path)
    except ImageFieldError as exc:
        return str(exc).replace(f"{field}: ", f"{field} ({name}): ", 1)
    return f"{field} ({name}): the picture could not be decoded; save it as PNG or JPEG and try again."


def _payload_path(payload: Any) -> str | None:
    for candidate in (payload, getattr(payload, "background", None)):
        path = getattr(candidate, "path", None)
        if path:
            return str(path)
    return None


def _payload_name(payload: Any) -> str | None:
    for candidate in (payload, getattr(payload, "background", None)):
        name = getattr(candidate, "orig_name", None)
        if name:
            return str(name)
    return None


def checked(component: Any, field: str) -> Any:
    """``component`` (a ``gr.Image`` or ``gr.ImageEditor``) with its decoding wrapped: an upload it
    cannot decode reaches the handler as an :class:`UnreadableUpload` naming ``field``.

    The wrapper is set on the instance rather than by subclassing: Gradio's component metaclass
    writes a ``.pyi`` stub beside any module that defines a component class, at import time."""
    decode = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except DECODE_ERRORS:
            return UnreadableUpload(describe_upload(field, payload))

    component.preprocess = preprocess
    return component


def CheckedImage(*, field: str, **kwargs: Any) -> Any:  # noqa: N802 - used like the component class
    """A ``gr.Image`` that reports an unreadable upload by ``field``."""
    return checked(gr.Image(**kwargs), field)


def CheckedImageEditor(*, field: str, **kwargs: Any) -> Any:  # noqa: N802 - used like the component class
    """A ``gr.ImageEditor`` that reports an unreadable background by ``field``."""
    return checked(gr.ImageEditor(**kwargs), field)


def readable(value: Any) -> Any:
    """``value`` itself; an :class:`UnreadableUpload` is raised as the user's error (a ValueError)."""
    if isinstance(value, UnreadableUpload):
        raise ValueError(value.message)
    return value


def check_uploaded_file(field: str, path: str | Path, name: str | None = None) -> str:
    """A file from a multi-file upload, checked now (the batch tab queues one job per file): its
    path, or a ValueError naming the file and what is wrong with it."""
    from contract.image_inputs import ImageFieldError, check_image_input

    try:
        check_image_input(field, str(path))
    except ImageFieldError as exc:
        shown = name or Path(path).name
        raise ValueError(str(exc).replace(f"{field}: ", f"{field} ({shown}): ", 1)) from None
    return str(path)
