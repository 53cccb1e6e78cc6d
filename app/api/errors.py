"""Every failure becomes a JSON answer in the client's vocabulary, never a traceback.

Bodies follow A1111's error shape (``{"error", "detail", "errors"}``) so its clients show the
message they already know how to show. Invalid request fields give 422 with one line per field;
an unknown sampler gives 400 as A1111 does; model lookups that fail give 404; a full queue 429.
Anything unexpected is logged with its traceback here and answered with a generic 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.errors import ModelNotFoundError, StudioError

log = logging.getLogger(__name__)


class SamplerNotFoundError(ValueError):
    """Raised by the routes for an unknown ``sampler_name`` (A1111 answers 400)."""


def error_body(error: str, detail: Any, errors: str | None = None) -> dict[str, Any]:
    return {"error": error, "detail": detail, "errors": errors if errors is not None else str(detail)}


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without the echoed input (a base64 image can be megabytes)."""
    items = []
    for item in errors:
        location = [part for part in item.get("loc", ()) if part != "body"]
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        items.append({"loc": location, "msg": message, "type": item.get("type", "value_error")})
    return items


def describe_fields(items: Sequence[dict[str, Any]]) -> str:
    """``width: must be a multiple of 8`` lines, one per problem."""
    lines = []
    for item in items:
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        lines.append(message if not where or message.startswith(f"{where}: ") else f"{where}: {message}")
    return "\n".join(lines)


def validation_response(errors: Sequence[Any]) -> JSONResponse:
    unknown_sampler = _unknown_sampler_message(errors)
    if unknown_sampler is not None:
        return JSONResponse(status_code=400, content=error_body("SamplerNotFound", unknown_sampler))
    items = field_errors(errors)
    return JSONResponse(status_code=422, content=error_body("ValidationError", items, describe_fields(items)))


def _unknown_sampler_message(errors: Sequence[Any]) -> str | None:
    from contract.samplers import UnknownSamplerError

    for item in errors:
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, UnknownSamplerError):
            return f"Sampler not found: {str(cause).removeprefix('sampler_name: ')}"
    return None


def status_for(exc: StudioError) -> int:
    from app.jobs.queue import QueueFullError
    from pipelines.generation.image_ops import ImageInputError

    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, ImageInputError):
        return 422
    return 400


def install_error_handlers(app: FastAPI) -> None:
    async def on_request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc.errors())

    async def on_pydantic_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError)
        return validation_response(exc.errors())

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body("HTTPException", exc.detail),
            headers=getattr(exc, "headers", None),
        )

    async def on_studio(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StudioError)
        code = status_for(exc)
        headers = {"Retry-After": "10"} if code == 429 else None
        return JSONResponse(
            status_code=code, content=error_body(type(exc).__name__, str(exc)), headers=headers
        )

    async def on_value(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, SamplerNotFoundError):
            return JSONResponse(status_code=400, content=error_body("SamplerNotFound", str(exc)))
        return JSONResponse(status_code=400, content=error_body(type(exc).__name__, str(exc)))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("API error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            status_code=500,
            content=error_body("InternalError", "Internal server error; the server log has the details."),
        )

    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(ValidationError, on_pydantic_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(StudioError, on_studio)
    app.add_exception_handler(ValueError, on_value)
    app.add_exception_handler(Exception, on_unexpected)
