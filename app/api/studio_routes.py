"""``/studio/v1``: jobs that return at once with an id, their state, and a live event stream.

``POST /studio/v1/jobs`` records the job durably and answers 202 with its id before any work is
done; ``GET /studio/v1/jobs/{id}`` gives its state, place in the queue, progress and result links;
``DELETE`` cancels it (or interrupts it if it is running); ``GET /studio/v1/jobs/{id}/events`` is
a Server-Sent Events stream of progress (with optional live previews) that ends with the final
state. With auth on, each user sees only their own jobs.

Talking-head jobs (``mode: talking_head``) send their portrait and speech as base64 (see
``app/api/talking_head_jobs.py``); their MP4 and its JSON sidecar are linked under ``links.videos``
and ``links.sidecars``, served by the same file route as images.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Discriminator, Tag
from starlette.concurrency import run_in_threadpool

from app.api.context import JOBS_PREFIX, ApiContext
from app.api.images import sanitise_request_images
from app.api.schemas import JobAccepted, JobList, JobView, TalkingHeadApiRequest
from app.api.security import Caller
from app.api.talking_head_jobs import submit_talking_head_job
from contract.images import ExtrasRequest, Img2ImgRequest, Txt2ImgRequest

JOB_KINDS = ("txt2img", "img2img", "extras", "talking_head")


def _job_kind(body: Any) -> str:
    """The body's ``mode``; without one, img2img when it has ``init_images``, extras when it has an
    ``image``, else txt2img (A1111 clients never send ``mode``). 422s then name only that kind's
    fields, e.g. ``img2img.denoising_strength``."""
    get = body.get if isinstance(body, dict) else lambda key: getattr(body, key, None)
    mode = get("mode")
    if mode:
        return str(mode)
    if get("init_images") is not None:
        return "img2img"
    return "extras" if get("image") is not None else "txt2img"


JobBody = Annotated[
    Annotated[Txt2ImgRequest, Tag("txt2img")]
    | Annotated[Img2ImgRequest, Tag("img2img")]
    | Annotated[ExtrasRequest, Tag("extras")]
    | Annotated[TalkingHeadApiRequest, Tag("talking_head")],
    Discriminator(_job_kind),
]
VIDEO_SUFFIXES = (".mp4",)
EVENT_POLL_SECONDS = 0.25
PREVIEW_EVERY_SECONDS = 1.0


def job_view(context: ApiContext, status: Any) -> dict[str, Any]:
    images: list[str] = []
    videos: list[str] = []
    for path in status.images:
        if (link := context.file_link(path)) is not None:
            (videos if str(path).lower().endswith(VIDEO_SUFFIXES) else images).append(link)
    sidecar = (status.info or {}).get("sidecar") if status.kind == "talking_head" else None
    sidecars = [link] if sidecar and (link := context.file_link(sidecar)) is not None else []
    return {
        "id": status.id,
        "kind": status.kind,
        "state": status.state,
        "position": status.position,
        "progress": status.progress,
        "step": status.step,
        "steps": status.steps,
        "eta_seconds": status.eta_seconds,
        "message": status.message,
        "error": status.error,
        "info": status.info,
        "worker": status.worker,
        "attempts": status.attempts,
        "links": {
            "self": f"{JOBS_PREFIX}/{status.id}",
            "events": f"{JOBS_PREFIX}/{status.id}/events",
            "images": images,
            "videos": videos,
            "sidecars": sidecars,
        },
    }


def studio_router(context: ApiContext) -> APIRouter:
    router = APIRouter(prefix="/studio/v1", tags=["studio"])
    caller_dependency = Depends(context.auth.require_user)

    def visible_status(job_id: str, caller: Caller) -> Any:
        status = context.queue.status(job_id)
        if status is None or not context.may_see(status, caller):
            raise HTTPException(status_code=404, detail=f"job {job_id} not found")
        return status

    @router.get("/health", dependencies=[caller_dependency])
    def health() -> dict[str, Any]:
        """The server is up and its queue answers."""
        return {"status": "ok", "queued": len(context.queue.store.queued_ids())}

    @router.post("/jobs", status_code=202, response_model=JobAccepted)
    async def submit_job(body: Annotated[JobBody, Body()], caller: Caller = caller_dependency) -> Any:
        """Queue a job (``mode``: txt2img, img2img, extras, or talking_head; A1111 field names for
        images) and return its id at once. A talking head's files are sent as base64; 422 names a
        field whose file is unusable. 429 when the queue is full."""
        if isinstance(body, TalkingHeadApiRequest):
            job_id = await run_in_threadpool(submit_talking_head_job, context, body, caller.owner)
            return await _accepted(context, job_id)
        payload = await run_in_threadpool(sanitise_request_images, body.model_dump(mode="json"))
        settings = payload.get("override_settings")
        if isinstance(settings, dict):
            if settings.get("sd_model_checkpoint"):
                await run_in_threadpool(context.find_checkpoint, str(settings["sd_model_checkpoint"]))
            context.pin_checkpoint(settings)
        request = type(body).model_validate(payload)
        job_id = await context.submit(request, caller)
        return await _accepted(context, job_id)

    @router.get("/jobs", response_model=JobList)
    def list_jobs(limit: int = Query(50, ge=1, le=500), caller: Caller = caller_dependency) -> Any:
        """Recent jobs, newest first (only the caller's own when auth is on)."""
        owner = caller.owner if caller.authenticated else None
        return {"jobs": [job_view(context, s) for s in context.queue.list(owner=owner, limit=limit)]}

    @router.get("/jobs/{job_id}", response_model=JobView)
    def get_job(job_id: str, caller: Caller = caller_dependency) -> Any:
        """A job's state, position in the queue, progress and result links."""
        return job_view(context, visible_status(job_id, caller))

    @router.delete("/jobs/{job_id}", response_model=JobView)
    def cancel_job(job_id: str, caller: Caller = caller_dependency) -> Any:
        """Cancel a waiting job or interrupt a running one; 409 if it already finished."""
        status = visible_status(job_id, caller)
        if status.finished or not context.queue.cancel(job_id):
            raise HTTPException(status_code=409, detail=f"job {job_id} already finished ({status.state})")
        return job_view(context, context.queue.status(job_id))

    @router.get("/jobs/{job_id}/events", response_class=StreamingResponse)
    async def job_events(
        job_id: str,
        request: Request,
        previews: bool = Query(False),
        caller: Caller = caller_dependency,
    ) -> StreamingResponse:
        """Server-Sent Events: ``progress`` whenever the job moves (with links to the images saved so
        far, and ``preview``, a base64 PNG, when ``previews=true``), then one ``end`` event with the
        final state."""
        await run_in_threadpool(visible_status, job_id, caller)
        return StreamingResponse(
            _event_stream(context, job_id, request, previews),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


async def _accepted(context: ApiContext, job_id: str) -> dict[str, Any]:
    status = await run_in_threadpool(context.queue.status, job_id)
    view = job_view(context, status)
    return {"id": job_id, "state": view["state"], "position": view["position"], "links": view["links"]}


async def _event_stream(
    context: ApiContext, job_id: str, request: Request, previews: bool
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    last_sent: tuple[Any, ...] | None = None
    last_preview = 0.0
    while True:
        status = await run_in_threadpool(context.queue.status, job_id)
        if status is None:
            return
        view = job_view(context, status)
        if status.finished:
            yield _sse("end", view)
            return
        key = (status.state, status.position, status.step, status.steps, status.message, len(status.images))
        if key != last_sent:
            last_sent = key
            event = {
                k: view[k]
                for k in ("id", "state", "position", "progress", "step", "steps", "eta_seconds", "message")
            }
            event["images"] = view["links"]["images"]  # outputs saved so far
            event["videos"] = view["links"]["videos"]
            due = loop.time() - last_preview >= PREVIEW_EVERY_SECONDS
            if previews and status.preview is not None and due:
                last_preview = loop.time()
                event["preview"] = base64.b64encode(status.preview).decode("ascii")  # a small JPEG
            if status.worker:
                event["worker"] = status.worker
            yield _sse("progress", event)
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
