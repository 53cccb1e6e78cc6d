"""The right-hand side of a generation tab: progress, live preview, gallery, infotext and the
"send to" buttons, plus the generator that streams a run into them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from app.ui.job_runner import JobRunner, RunUpdate, TabSession, job_owner, progress_html, user_message

SEND_TARGETS = {
    "img2img": "Send to img2img",
    "inpaint": "Send to inpaint",
    "extras": "Send to extras",
    "talking_head": "Send to talking head",
}


@dataclass
class ResultsPanel:
    prefix: str
    state: Any
    progress: Any
    preview: Any
    gallery: Any
    infotext: Any
    notes: Any
    send_buttons: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> set[Any]:
        return {self.state, self.progress, self.preview, self.gallery, self.infotext, self.notes}

    # what a run shows -------------------------------------------------------------------------
    def show(self, session: TabSession, update: RunUpdate) -> dict[Any, Any]:
        values: dict[Any, Any] = {
            self.state: session,
            self.progress: progress_html(update.text, update.fraction, update.state),
        }
        if update.preview is not None:
            values[self.preview] = gr.update(value=update.preview, visible=True)
        if update.finished:
            values[self.preview] = gr.update(value=None, visible=False)
        if update.images_changed:
            values[self.gallery] = gr.update(
                value=[image.path for image in session.images],
                selected_index=min(session.selected, len(session.images) - 1) if session.images else None,
            )
            chosen = session.selected_image()
            values[self.infotext] = chosen.infotext if chosen else ""
        if update.finished:
            values[self.notes] = "\n".join(f"- {note}" for note in session.notes)
        return values

    def failure(self, session: TabSession, message: str) -> dict[Any, Any]:
        return {
            self.state: session,
            self.progress: progress_html(f"Error: {message}", 0.0, "failed"),
            self.preview: gr.update(value=None, visible=False),
        }

    def stream(
        self,
        runner: JobRunner,
        session: TabSession,
        build_requests: Callable[[], list[Any]],
        request: gr.Request | None,
    ) -> Iterator[dict[Any, Any]]:
        """Build the requests, queue them and stream the run; errors become readable messages
        (shown under the buttons and as a toast), never a traceback."""
        try:
            requests = build_requests()
            runner.submit(session, requests, job_owner(request))
        except Exception as exc:
            message = user_message(exc)
            yield self.failure(session, message)
            raise gr.Error(message, print_exception=False) from None
        yield {
            self.state: session,
            self.progress: progress_html("Queued", 0.0, "queued"),
            self.gallery: gr.update(value=[]),
            self.infotext: "",
            self.notes: "",
        }
        try:
            for update in runner.follow(session):
                yield self.show(session, update)
                if update.error:
                    raise gr.Error(update.error, print_exception=False)
        except gr.Error:
            raise
        except Exception as exc:
            message = user_message(exc)
            yield self.failure(session, message)
            raise gr.Error(message, print_exception=False) from None


def restore_handler(
    panel: ResultsPanel, runner: JobRunner, kind: str
) -> Callable[..., Iterator[dict[Any, Any]]]:
    """The page-load handler that brings this user's jobs of ``kind`` back after a reload: the
    last results in the gallery, or the waiting/running job followed live again."""

    def restore(data: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        session = TabSession()
        try:
            shown = runner.restore(session, job_owner(request), kind)
        except Exception as exc:  # a page must load even when the job store cannot be read
            yield panel.failure(session, user_message(exc))
            return
        if shown is not None:
            yield panel.show(session, shown)
            return
        if not session.job_ids:
            return
        for update in runner.follow(session):
            yield panel.show(session, update)

    return restore


def build(prefix: str, *, send_targets: tuple[str, ...] = tuple(SEND_TARGETS)) -> ResultsPanel:
    """Render the panel (inside the caller's column) and wire gallery selection."""
    state = gr.State(TabSession())
    progress = gr.HTML(progress_html("", 0.0, "idle"), elem_id=f"{prefix}_progress")
    preview = gr.Image(
        label="Live preview",
        visible=False,
        interactive=False,
        elem_id=f"{prefix}_preview",
        format="png",
        height=320,
    )
    gallery = gr.Gallery(
        label="Output",
        columns=4,
        height="auto",
        object_fit="contain",
        elem_id=f"{prefix}_gallery",
        interactive=False,
    )
    send_buttons: dict[str, Any] = {}
    with gr.Row():
        for target in send_targets:
            send_buttons[target] = gr.Button(
                SEND_TARGETS[target], size="sm", elem_id=f"{prefix}_send_to_{target}", min_width=100
            )
    infotext = gr.Textbox(
        label="Generation parameters",
        lines=4,
        interactive=False,
        elem_id=f"{prefix}_infotext",
        buttons=["copy"],
    )
    notes = gr.Markdown("", elem_id=f"{prefix}_notes")
    panel = ResultsPanel(prefix, state, progress, preview, gallery, infotext, notes, send_buttons)

    def select_image(data: dict[Any, Any], event: gr.SelectData) -> dict[Any, Any]:
        session: TabSession = data[state]
        session.selected = int(event.index) if isinstance(event.index, int) else 0
        chosen = session.selected_image()
        return {state: session, infotext: chosen.infotext if chosen else ""}

    gallery.select(select_image, inputs={state}, outputs={state, infotext}, show_progress="hidden")
    return panel
