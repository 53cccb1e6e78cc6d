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
        log = gr.Textbox(label="Download log", lines=3, interactive=False)

    def download(data: dict[Any, Any], progress: gr.Progress = gr.Progress(track_tqdm=True)) -> str:  # noqa: B008
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
            raise gr.Error(str(exc)) from None
        services.registry.refresh()
        messages += [f"saved {path}" for path in paths]
        return "\n".join(messages)

    event = button.click(download, inputs={source, filename, kind}, outputs=log, concurrency_id="download")
    if after_download is not None:
        event.success(after_download, outputs=refreshed)
