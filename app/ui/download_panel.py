"""A small panel to download a model on purpose (never a side effect of loading)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.services import StudioServices


def build(services: StudioServices, *, after_download: Any = None, refreshed: Any = None) -> None:
    """Render the panel; ``after_download`` (a function updating ``refreshed``) runs when a
    download finishes, e.g. to refresh the checkpoint dropdown."""
    import gradio as gr

    from pipelines.models.download import MODEL_KINDS, STANDARD_SD15, STANDARD_SD15_FILE

    with gr.Accordion("Download a model", open=not services.registry.checkpoints()):
        gr.Markdown(
            "Hugging Face repo (`owner/name`), `owner/name/file.safetensors`, or an https URL. "
            "`HF_ENDPOINT` selects a mirror. Interrupted downloads resume when started again."
        )
        with gr.Row():
            source = gr.Textbox(label="Repo or URL", value=STANDARD_SD15, scale=3)
            filename = gr.Textbox(label="File in repo (optional)", value=STANDARD_SD15_FILE, scale=2)
            kind = gr.Dropdown(label="Folder", choices=list(MODEL_KINDS), value="Stable-diffusion", scale=1)
        button = gr.Button("Download")
        log = gr.Textbox(label="Download log", lines=3, interactive=False, elem_id="download_log")

    def download(data: dict[Any, Any]) -> str:
        """The log keeps what happened, a failure included: a toast vanishes after seconds, and an
        expected failure (a wrong name, no network) is the user's to fix, not a traceback."""
        from pipelines.models.download import DownloadError, download_model

        messages: list[str] = []
        try:
            paths = download_model(
                str(data[source]).strip(),
                services.settings.models_dir,
                kind=str(data[kind]),
                filename=str(data[filename]).strip() or None,
                on_message=messages.append,
            )
        except DownloadError as exc:
            messages.append(f"Download failed: {exc}")
            gr.Warning(f"Download failed: {exc}")
            raise DownloadFailed("\n".join(messages)) from None
        services.registry.refresh()
        messages += [f"saved {path}" for path in paths]
        return "\n".join(messages)

    def download_into_log(
        data: dict[Any, Any],
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's progress hook
    ) -> tuple[str, bool]:
        try:
            return download(data), True
        except DownloadFailed as failed:
            return str(failed), False

    ok = gr.State(False)
    event = button.click(
        download_into_log, inputs={source, filename, kind}, outputs=[log, ok], concurrency_id="download"
    )
    if after_download is not None:
        event.success(
            lambda succeeded: after_download() if succeeded else gr.update(), inputs=ok, outputs=refreshed
        )


class DownloadFailed(Exception):  # noqa: N818 - carries the log text, not a programming error
    """A download that failed for a reason the user can act on; its text is the whole log."""
