"""Every job kind the studio queue runs: the image modes from ``pipelines`` plus the talking head
from ``sadtalker`` (the libraries don't know each other; the app joins them)."""

from __future__ import annotations

from typing import Any

from contract.images import REQUEST_TYPES, parse_request


def job_modes() -> tuple[str, ...]:
    return (*REQUEST_TYPES, "talking_head")


def parse_job_request(payload: dict[str, Any]) -> Any:
    """The request object for a JSON job (``mode`` picks the kind, txt2img by default)."""
    if payload.get("mode") == "talking_head":
        from contract.talking_head import TalkingHeadRequest

        return TalkingHeadRequest.model_validate(payload)
    return parse_request(payload)
