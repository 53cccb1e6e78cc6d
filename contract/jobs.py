"""Every job kind the studio runs, as one union on ``mode``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from contract.images import REQUEST_TYPES, ExtrasRequest, Img2ImgRequest, Txt2ImgRequest, parse_request
from contract.talking_head import TalkingHeadRequest

JobRequest = Annotated[
    Txt2ImgRequest | Img2ImgRequest | ExtrasRequest | TalkingHeadRequest, Field(discriminator="mode")
]
"""Any job, told apart by its ``mode``."""

JOB_MODES: tuple[str, ...] = (*REQUEST_TYPES, "talking_head")


def parse_job_request(
    payload: dict[str, Any],
) -> Txt2ImgRequest | Img2ImgRequest | ExtrasRequest | TalkingHeadRequest:
    """The request object for a JSON job. ``mode`` picks the kind; without it the kind is inferred
    as A1111 clients send it (``init_images``: img2img, else txt2img). Validation errors name the
    field without the kind as a prefix."""
    if payload.get("mode") == "talking_head":
        return TalkingHeadRequest.model_validate(payload)
    return parse_request(payload)


def job_mode(request: Any) -> str:
    return str(getattr(request, "mode", "txt2img"))
