"""Queue tab: this user's jobs (with their prompts) and the studio's queue (state and position
only: other people's prompts and images are never shown)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui.job_runner import describe_status, job_owner

if TYPE_CHECKING:
    from app.jobs.queue import JobStatus
    from app.services import StudioServices

PREFIX = "queue"
REFRESH_SECONDS = 2.0
MY_COLUMNS = ["Job", "Kind", "State", "Position", "Progress", "Prompt", "Submitted"]
STUDIO_COLUMNS = ["Position", "Kind", "State", "Progress", "Owner", "Worker"]
WORKER_COLUMNS = [
    "Worker",
    "Device",
    "State",
    "Loaded model",
    "Jobs done",
    "Restarts",
    "GPU memory",
    "Running job",
    "Busy",
]
PROMPT_PREVIEW = 80


def _progress(status: JobStatus) -> str:
    if status.state in ("queued", "running"):
        return f"{status.progress * 100:.0f}% {describe_status(status)}"
    return describe_status(status)


def my_jobs(services: StudioServices, owner: str, limit: int = 50) -> list[list[Any]]:
    queue = services.queue
    records = {record.id: record for record in queue.store.list(owner=owner, limit=limit)}
    rows = []
    for status in queue.list(owner=owner, limit=limit):
        record = records.get(status.id)
        request = record.request if record else {}
        prompt = str(request.get("prompt", "") or "")
        if len(prompt) > PROMPT_PREVIEW:
            prompt = prompt[: PROMPT_PREVIEW - 1] + "…"
        submitted = time.strftime("%H:%M:%S", time.localtime(record.created)) if record else ""
        rows.append(
            [
                status.id[:8],
                status.kind,
                status.state,
                status.position or "",
                _progress(status),
                prompt,
                submitted,
            ]
        )
    return rows


def studio_queue(services: StudioServices, owner: str, limit: int = 200) -> list[list[Any]]:
    """Running and waiting jobs of everyone, in run order; owners other than you stay anonymous."""
    active = [s for s in services.queue.list(limit=limit) if s.state in ("queued", "running")]
    active.sort(key=lambda s: (s.state != "running", s.position or 0))
    return [
        [
            "running" if s.state == "running" else s.position,
            s.kind,
            s.state,
            _progress(s),
            "you" if s.owner == owner else "another user",
            s.worker or "",
        ]
        for s in active
    ]


def worker_rows(services: StudioServices) -> list[list[Any]]:
    """What each worker reports: its device, whether it is busy, starting or gone, its model."""
    rows = []
    for handle in services.workers.handles:
        state = handle.state
        if handle.current_job:
            condition = "running a job"
        elif handle.ready:
            condition = "idle"
        elif getattr(handle, "node_alive", True) is False:
            condition = "gone (its PC left the cluster)"
        elif state.alive or handle.restarts == 0:
            condition = "starting"
        else:
            condition = "stopped (crashed; restarting)"
        rows.append(
            [
                handle.worker_id,
                f"{state.device} on {state.host}" if state.host else state.device,
                condition,
                state.current_checkpoint or "",
                state.jobs_done,
                handle.restarts,
                f"{state.vram_total_bytes / 2**30:.0f} GB" if state.vram_total_bytes else "",
                (handle.current_job or "")[:8],
                f"{services.queue.stats.worker(handle.worker_id).busy_fraction():.0%}",
            ]
        )
    return rows


def cluster_summary(services: StudioServices) -> str:
    """One line over the workers: PCs, workers up, jobs waiting/running, the cost model's error."""
    handles = list(services.workers.handles)
    hosts = {handle.state.host or "this PC" for handle in handles if handle.ready or handle.current_job}
    up = sum(1 for handle in handles if handle.ready or handle.current_job)
    counts = services.queue.store.counts_by_state()
    error = services.queue.cost_model.mean_relative_error()
    accuracy = f"; time estimates off by {error:.0%} on average lately" if error is not None else ""
    return (
        f"**{len(hosts)} PC(s), {up} of {len(handles)} worker(s) up**; {counts.get('queued', 0)} job(s) "
        f"waiting, {counts.get('running', 0)} running{accuracy}."
    )


def cancellable(services: StudioServices, owner: str) -> list[tuple[str, str]]:
    return [
        (f"{s.id[:8]} {s.kind} ({s.state})", s.id)
        for s in services.queue.list(owner=owner, limit=50)
        if s.state in ("queued", "running")
    ]


@dataclass
class QueueTab:
    timer: Any  # ticks only while the Queue tab is open (see ``on_tab_selected``)
    auto: Any
    refresh: Any
    tables: list[Any]  # [your jobs, studio queue, workers]
    refresh_lists: Callable[..., tuple[Any, Any, Any]]  # event handler filling ``tables``

    def on_tab_selected(self, selected: bool, auto_refresh: bool) -> Any:
        return gr.Timer(active=selected and bool(auto_refresh))


def build(services: StudioServices) -> QueueTab:
    gr.Markdown(
        "Jobs run one at a time per worker (one worker per GPU), taking turns between users. "
        "Your jobs are listed with their prompts; the studio queue shows everyone's jobs anonymously."
    )
    with gr.Row():
        refresh = gr.Button("🔄 Refresh", elem_id=f"{PREFIX}_refresh", scale=0, min_width=120)
        auto = gr.Checkbox(label="Refresh every 2 seconds", value=True, elem_id=f"{PREFIX}_auto", scale=0)
    gr.Markdown("### Your jobs")
    mine = gr.Dataframe(
        headers=MY_COLUMNS,
        value=[],
        interactive=False,
        wrap=True,
        elem_id=f"{PREFIX}_mine",
    )
    with gr.Row():
        to_cancel = gr.Dropdown(
            choices=[], label="Your waiting or running job", elem_id=f"{PREFIX}_cancel_choice"
        )
        cancel = gr.Button("Cancel job", variant="stop", elem_id=f"{PREFIX}_cancel", scale=0, min_width=120)
    gr.Markdown("### Studio queue")
    studio = gr.Dataframe(
        headers=STUDIO_COLUMNS,
        value=[],
        interactive=False,
        elem_id=f"{PREFIX}_studio",
    )
    gr.Markdown("### Workers and cluster (one worker per GPU, on every PC of the studio)")
    summary = gr.Markdown("", elem_id=f"{PREFIX}_cluster_summary")
    workers = gr.Dataframe(headers=WORKER_COLUMNS, value=[], interactive=False, elem_id=f"{PREFIX}_workers")
    timer = gr.Timer(REFRESH_SECONDS, active=False)

    def refresh_tables(request: gr.Request) -> tuple[Any, Any, Any, Any, Any]:
        owner = job_owner(request)
        services.start_queue()
        choices = cancellable(services, owner)
        return (
            gr.update(value=my_jobs(services, owner)),
            gr.update(value=studio_queue(services, owner)),
            gr.update(value=worker_rows(services)),
            gr.update(choices=choices, value=choices[0][1] if choices else None),
            gr.update(value=cluster_summary(services)),
        )

    def refresh_lists(request: gr.Request) -> tuple[Any, Any, Any, Any]:
        owner = job_owner(request)
        return (
            gr.update(value=my_jobs(services, owner)),
            gr.update(value=studio_queue(services, owner)),
            gr.update(value=worker_rows(services)),
            gr.update(value=cluster_summary(services)),
        )

    def cancel_job(job_id: str | None, request: gr.Request) -> tuple[Any, Any, Any, Any, Any]:
        owner = job_owner(request)
        status = services.queue.status(job_id) if job_id else None
        if status is None or status.owner != owner:
            raise gr.Error("Pick one of your waiting or running jobs to cancel.", print_exception=False)
        services.queue.cancel(job_id)
        return refresh_tables(request)

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    outputs = [mine, studio, workers, to_cancel, summary]
    refresh.click(refresh_tables, outputs=outputs, **quiet)
    timer.tick(refresh_lists, outputs=[mine, studio, workers, summary], **quiet)
    cancel.click(cancel_job, inputs=to_cancel, outputs=outputs, **quiet)
    auto.change(lambda on: gr.Timer(active=on), inputs=auto, outputs=timer, queue=False)
    return QueueTab(
        timer=timer,
        auto=auto,
        refresh=refresh,
        tables=[mine, studio, workers, summary],
        refresh_lists=refresh_lists,
    )
