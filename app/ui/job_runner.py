"""Submit a tab's requests to the studio's job queue and follow them until they finish.

A Gradio event never runs a model itself: it puts requests on :class:`app.jobs.queue.JobQueue`
(which runs one job at a time per GPU, fairly between users) and then *watches*: it polls the
job's status and yields what a user sees, "Queued: position 2", "Loading model...",
"Step 7/20, ETA 3s", a live preview, and the gallery as images are saved. Interrupt and Skip act
on the job ids kept in the tab's :class:`TabSession`, which lives in ``gr.State``: one per browser
tab, never shared between users.

Every GPU event shares :data:`GPU_CONCURRENCY_ID`. Its limit is the number of sessions that may
submit and watch at once, not the number of jobs running: the queue is what keeps the GPU to one
job, and it tells the others their position.
"""

from __future__ import annotations

import html
import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from contract.images import format_validation_error
from pipelines.errors import StudioError

if TYPE_CHECKING:
    from PIL import Image

    from app.jobs.queue import JobStatus
    from app.services import StudioServices

log = logging.getLogger(__name__)

GPU_CONCURRENCY_ID = "gpu"
GPU_EVENT_LIMIT = 32  # sessions submitting/watching at once (the queue runs one job per GPU)
POLL_SECONDS = 0.25


@dataclass
class ResultImage:
    """One finished image: its file, its infotext and its seed (when known)."""

    path: str
    infotext: str = ""
    seed: int | None = None


@dataclass
class TabSession:
    """What one browser tab remembers for one studio tab (kept in ``gr.State``)."""

    job_ids: list[str] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)  # job id -> batch count (n_iter)
    images: list[ResultImage] = field(default_factory=list)
    selected: int = 0
    last_seed: int | None = None
    stop_requested: bool = False
    notes: list[str] = field(default_factory=list)

    def start(self, job_ids: list[str], batches: dict[str, int] | None = None) -> None:
        self.job_ids = list(job_ids)
        self.batches = dict(batches or {})
        self.images = []
        self.selected = 0
        self.stop_requested = False
        self.notes = []

    def selected_image(self) -> ResultImage | None:
        if not self.images:
            return None
        return self.images[min(max(self.selected, 0), len(self.images) - 1)]


@dataclass
class RunUpdate:
    """One refresh of what the user sees while jobs run."""

    text: str
    fraction: float
    state: str  # queued, running, done, cancelled, failed
    images_changed: bool = False
    preview: Image.Image | None = None
    finished: bool = False
    error: str | None = None


BROWSER_ID_COOKIE = "sdstudio_browser"
"""A random id the page keeps in the browser (``localStorage`` and a cookie, see
:data:`BROWSER_ID_HEAD`), so a user without ``--auth`` finds their jobs again after a reload."""

BROWSER_ID_HEAD = f"""<script>
(() => {{
  const key = "{BROWSER_ID_COOKIE}";
  let id = null;
  try {{ id = localStorage.getItem(key); }} catch (e) {{}}
  if (!id || !/^[0-9a-f]{{32}}$/.test(id)) {{
    const match = document.cookie.match(new RegExp("(?:^|; )" + key + "=([0-9a-f]{{32}})"));
    id = match ? match[1] : Array.from(crypto.getRandomValues(new Uint8Array(16)),
      (b) => b.toString(16).padStart(2, "0")).join("");
    try {{ localStorage.setItem(key, id); }} catch (e) {{}}
  }}
  document.cookie = key + "=" + id + "; path=/; max-age=31536000; SameSite=Strict";
}})();
</script>"""


def browser_id(request: Any) -> str | None:
    """The id this browser keeps for the studio (None before the page has set it)."""
    import re

    try:
        cookies = getattr(request, "cookies", None) or {}
        value = cookies.get(BROWSER_ID_COOKIE)
    except Exception:  # a request object without cookies (e.g. built by a test or the API)
        return None
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{32}", value) else None


def job_owner(request: Any) -> str:
    """Who owns a job: the logged-in user (``--auth``), else this browser (its kept id, so jobs
    come back after a reload or a restart of the studio), else this page session."""
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return str(username)
    kept = browser_id(request) if request is not None else None
    if kept:
        return f"browser-{kept}"
    session_hash = getattr(request, "session_hash", None) if request is not None else None
    return f"session-{session_hash}" if session_hash else "local"


def user_message(error: BaseException) -> str:
    """What to show a user for an exception: our errors as they are, anything else generic
    (with the traceback in the server log, never in the page)."""
    if isinstance(error, ValidationError):
        return format_validation_error(error)
    if isinstance(error, (StudioError, ValueError, FileNotFoundError)):
        return str(error)
    log.error("unexpected error in the UI", exc_info=error)
    return (
        f"Something went wrong ({error.__class__.__name__}). The details are in the studio's log; "
        "the studio is still running, so you can change the settings and try again."
    )


def format_eta(seconds: float) -> str:
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m {rest:02d}s"


def describe_status(status: JobStatus, batches: int = 1) -> str:
    """One line: "Queued: position 2", "Loading model x...", "Step 7/20, ETA 3s", "Done".

    With a batch count above one, the line starts with the batch: "Batch 2/4, Step 7/20".
    """
    if status.state == "queued":
        return f"Queued: position {status.position}" if status.position else "Queued"
    if status.state == "running":
        if status.steps:
            text = f"Step {status.step}/{status.steps}"
            if batches > 1:
                # progress = (batch index + step/steps) / batches, over the whole job
                batch = round(status.progress * batches - status.step / status.steps) + 1
                text = f"Batch {min(max(batch, 1), batches)}/{batches}, {text}"
            if status.eta_seconds is not None:
                text += f", ETA {format_eta(status.eta_seconds)}"
            return text
        return status.message or "Starting..."
    if status.state == "done":
        return "Done"
    if status.state == "cancelled":
        return "Interrupted"
    return f"Error: {status.error or 'the job failed'}"


PROGRESS_TRACK_STYLE = "height:8px;border-radius:4px;background:#8884;overflow:hidden;margin:4px 0"
PROGRESS_FILL_STYLE = "height:100%;background:#f97316;width:{percent:.1f}%"


def progress_html(text: str, fraction: float = 0.0, state: str = "idle") -> str:
    """The progress bar and its text (escaped: error messages may quote user input)."""
    percent = max(0.0, min(1.0, fraction)) * 100
    bar = ""
    if state in ("queued", "running"):
        fill = PROGRESS_FILL_STYLE.format(percent=percent)
        bar = f'<div style="{PROGRESS_TRACK_STYLE}"><div style="{fill}"></div></div>'
    text_style = ("color:#dc2626;" if state == "failed" else "") + "white-space:pre-wrap"
    return (
        f'<div class="sd-progress" data-state="{html.escape(state)}">{bar}'
        f'<span class="sd-progress-text" style="{text_style}">{html.escape(text)}</span></div>'
    )


def read_infotext(path: str) -> str:
    from pipelines.outputs.saving import read_png_parameters

    try:
        return read_png_parameters(Path(path)) or ""
    except (OSError, ValueError):
        return ""


class JobRunner:
    """Submits and follows jobs for the UI; one per studio, stateless per user."""

    def __init__(self, services: StudioServices) -> None:
        self.services = services

    # controlling ------------------------------------------------------------------------------
    def submit(self, session: TabSession, requests: list[Any], owner: str) -> list[str]:
        """Queue the requests (in order) for ``owner`` and remember their ids in the session."""
        queue = self.services.start_queue()
        job_ids: list[str] = []
        try:
            for request in requests:
                job_ids.append(queue.submit(request, owner=owner))
        except StudioError:
            for job_id in job_ids:
                queue.cancel(job_id)
            raise
        session.start(
            job_ids, {i: int(getattr(r, "n_iter", 1)) for i, r in zip(job_ids, requests, strict=True)}
        )
        return job_ids

    def interrupt(self, session: TabSession) -> None:
        """Stop the running job within one step and drop the session's queued ones."""
        session.stop_requested = True
        queue = self.services.queue
        for job_id in session.job_ids:
            queue.cancel(job_id)

    def skip(self, session: TabSession) -> None:
        """Abandon the current batch of the running job (A1111's Skip); later batches still run."""
        queue = self.services.queue
        for job_id in queue.running_ids():
            if job_id in session.job_ids:
                queue.skip(job_id)

    def restore(self, session: TabSession, owner: str, kind: str) -> RunUpdate | None:
        """After a reload: put the owner's jobs of ``kind`` back into a fresh session, from the
        durable queue. Waiting or running jobs are followed again (the caller then streams
        :meth:`follow`, and None is returned); else the newest finished job is shown with its
        results. Returns what to show for a finished job, or None."""
        queue = self.services.start_queue()
        records = [record for record in queue.store.list(owner=owner, limit=100) if record.kind == kind]
        if not records:
            return None
        active = [record for record in reversed(records) if record.state in ("queued", "running")]
        if active:
            session.start(
                [record.id for record in active],
                {record.id: int(record.request.get("n_iter", 1) or 1) for record in active},
            )
            return None
        newest = records[0]
        status = queue.status(newest.id)
        if status is None:
            return None
        session.start([newest.id], {newest.id: int(newest.request.get("n_iter", 1) or 1)})
        self._collect(session, 0, status)
        session.images = [image for image in session.images if Path(image.path).is_file()]  # deleted since
        if session.images and session.images[0].seed is not None:
            session.last_seed = session.images[0].seed
        if status.info:
            session.notes.extend(status.info.get("notes", []))
        when = time.strftime("%H:%M", time.localtime(newest.finished or newest.created))
        count = len(session.images)
        noun = "image" if count == 1 else "images"
        if status.state == "failed":
            return RunUpdate(
                f"Your last job ({when}) failed: {status.error or 'no reason given'}",
                1.0,
                "failed",
                images_changed=True,
                finished=True,
            )
        interrupted = status.state == "cancelled" or bool((status.info or {}).get("interrupted"))
        state_text = "interrupted" if interrupted else "done"
        return RunUpdate(
            f"Your last job ({when}, {state_text}): {count} {noun}",
            1.0,
            "cancelled" if interrupted else "done",
            images_changed=True,
            finished=True,
        )

    # following --------------------------------------------------------------------------------
    def follow(self, session: TabSession) -> Iterator[RunUpdate]:
        """Yield an update whenever something visible changes, until every job has finished."""
        queue = self.services.queue
        total = len(session.job_ids)
        errors: list[str] = []
        interrupted = False
        for index, job_id in enumerate(session.job_ids):
            prefix = f"Image {index + 1}/{total}: " if total > 1 else ""
            first_image = len(session.images)
            last_key: tuple[Any, ...] | None = None
            last_preview: bytes | None = None
            while True:
                try:
                    status = queue.wait(job_id, timeout=POLL_SECONDS)
                except KeyError:
                    errors.append("The job disappeared from the queue (the studio was reset?).")
                    break
                images_changed = self._collect(session, first_image, status)
                preview = None  # the worker renders previews; a new one is a small JPEG
                if (
                    status.state == "running"
                    and status.preview is not None
                    and status.preview is not last_preview
                ):
                    last_preview = status.preview
                    preview = _decode_preview(status.preview)
                key = (status.state, status.position, status.step, status.message, len(session.images))
                if key != last_key or preview is not None:
                    last_key = key
                    if not status.finished:
                        fraction = (index + status.progress) / max(1, total)
                        yield RunUpdate(
                            prefix + describe_status(status, session.batches.get(job_id, 1)),
                            fraction,
                            status.state,
                            images_changed=images_changed,
                            preview=preview,
                        )
                if status.finished:
                    break
            if last_key is None:
                continue
            if status.state == "failed":
                errors.append(status.error or "The job failed.")
            elif status.state == "cancelled":
                interrupted = True
            if status.info:
                session.notes.extend(
                    note for note in status.info.get("notes", []) if note not in session.notes
                )
                if status.info.get("interrupted"):
                    interrupted = True
            if session.stop_requested:
                interrupted = True
                break
        if session.images and session.images[0].seed is not None:
            session.last_seed = session.images[0].seed
        yield self._final_update(session, errors, interrupted)

    def _final_update(self, session: TabSession, errors: list[str], interrupted: bool) -> RunUpdate:
        count = len(session.images)
        noun = "image" if count == 1 else "images"
        if errors:
            text = "Error: " + "\n".join(errors)
            return RunUpdate(text, 1.0, "failed", images_changed=True, finished=True, error="\n".join(errors))
        if interrupted:
            return RunUpdate(
                f"Interrupted ({count} {noun} kept)", 1.0, "cancelled", images_changed=True, finished=True
            )
        return RunUpdate(f"Done: {count} {noun}", 1.0, "done", images_changed=True, finished=True)

    def _collect(self, session: TabSession, first_image: int, status: JobStatus) -> bool:
        """Add this job's newly saved images to the session; True when the list changed."""
        known = session.images[first_image:]
        if status.state == "done" and status.info and status.info.get("images"):
            paths = [str(p) for p in status.info["images"]]
            infotexts = list(status.info.get("infotexts") or [])
            seeds = list(status.info.get("all_seeds") or [])
            fresh = [
                ResultImage(
                    path,
                    infotexts[i] if i < len(infotexts) else read_infotext(path),
                    seeds[i] if i < len(seeds) else None,
                )
                for i, path in enumerate(paths)
            ]
            if [image.path for image in known] == paths and all(image.infotext for image in known):
                return False
            del session.images[first_image:]
            session.images.extend(fresh)
            return True
        new_paths = [str(p) for p in status.images[len(known) :]]
        for path in new_paths:
            infotext = read_infotext(path)
            session.images.append(ResultImage(path, infotext, _seed_from_infotext(infotext)))
        return bool(new_paths)


def _decode_preview(data: bytes) -> Image.Image | None:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError):
        return None


def _seed_from_infotext(infotext: str) -> int | None:
    from pipelines.outputs.infotext import InfotextValueError, parse_infotext

    if not infotext:
        return None
    try:
        return parse_infotext(infotext).seed
    except InfotextValueError:
        return None
