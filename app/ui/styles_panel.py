"""Styles: pick saved styles for a job, paste them into the prompts, and edit ``styles.csv``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gradio as gr

from app.styles import PromptStyle, StyleFileError

if TYPE_CHECKING:
    from app.services import StudioServices


def build(services: StudioServices, prefix: str, prompt: Any, negative_prompt: Any) -> Any:
    """Render the style picker and editor; returns the multiselect dropdown (its value is the
    request's ``styles`` list, applied by the executor when the job runs)."""
    store = services.styles
    with gr.Row(equal_height=True):
        styles = gr.Dropdown(
            choices=store.names(),
            value=[],
            multiselect=True,
            label="Styles",
            elem_id=f"{prefix}_styles",
            scale=4,
        )
        with gr.Column(scale=0, min_width=90):  # stacked: side by side they wrap in this narrow column
            refresh = gr.Button("🔄 Refresh", size="sm", elem_id=f"{prefix}_refresh_styles", min_width=90)
            paste = gr.Button("📋 Apply", size="sm", elem_id=f"{prefix}_apply_styles", min_width=90)
    with gr.Accordion("Style editor", open=False, elem_id=f"{prefix}_style_editor"):
        name = gr.Dropdown(
            choices=store.names(),
            value=None,
            allow_custom_value=True,
            label="Style name",
            elem_id=f"{prefix}_style_name",
        )
        style_prompt = gr.Textbox(label="Style prompt ({prompt} marks where the prompt goes)", lines=2)
        style_negative = gr.Textbox(label="Style negative prompt", lines=2)
        with gr.Row():
            copy = gr.Button("Copy from prompts", size="sm")
            save = gr.Button("💾 Save style", size="sm", elem_id=f"{prefix}_save_style")
            delete = gr.Button("🗑️ Delete style", size="sm")
        message = gr.Markdown("")

    def choices_update(selected: list[str] | None = None) -> Any:
        names = store.names()
        return gr.update(choices=names, value=[s for s in (selected or []) if s in names])

    def do_refresh(data: dict[Any, Any]) -> dict[Any, Any]:
        return {styles: choices_update(data[styles]), name: gr.update(choices=store.names())}

    def do_paste(data: dict[Any, Any]) -> dict[Any, Any]:
        try:
            text, negative = store.apply(data[prompt] or "", data[negative_prompt] or "", data[styles] or [])
        except StyleFileError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return {prompt: text, negative_prompt: negative, styles: gr.update(value=[])}

    def do_load(data: dict[Any, Any]) -> dict[Any, Any]:
        chosen = store.load().get(data[name] or "")
        if chosen is None:
            return {}
        return {style_prompt: chosen.prompt, style_negative: chosen.negative_prompt}

    def do_copy(data: dict[Any, Any]) -> dict[Any, Any]:
        return {style_prompt: data[prompt] or "", style_negative: data[negative_prompt] or ""}

    def do_save(data: dict[Any, Any]) -> dict[Any, Any]:
        style_name = (data[name] or "").strip()
        if not style_name:
            raise gr.Error("Give the style a name first.", print_exception=False)
        try:
            store.save_style(PromptStyle(style_name, data[style_prompt] or "", data[style_negative] or ""))
        except StyleFileError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return {
            styles: choices_update(data[styles]),
            name: gr.update(choices=store.names(), value=style_name),
            message: f"Saved style '{style_name}' to {store.path.name}.",
        }

    def do_delete(data: dict[Any, Any]) -> dict[Any, Any]:
        style_name = (data[name] or "").strip()
        try:
            removed = store.delete(style_name)
        except StyleFileError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        text = f"Deleted style '{style_name}'." if removed else f"There is no style '{style_name}'."
        return {
            styles: choices_update(data[styles]),
            name: gr.update(choices=store.names(), value=None),
            message: text,
        }

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    refresh.click(do_refresh, inputs={styles, name}, outputs={styles, name}, **quiet)
    paste.click(
        do_paste, inputs={prompt, negative_prompt, styles}, outputs={prompt, negative_prompt, styles}, **quiet
    )
    name.change(do_load, inputs={name}, outputs={style_prompt, style_negative}, **quiet)
    copy.click(do_copy, inputs={prompt, negative_prompt}, outputs={style_prompt, style_negative}, **quiet)
    editor_inputs = {name, style_prompt, style_negative, styles}
    save.click(do_save, inputs=editor_inputs, outputs={styles, name, message}, **quiet)
    delete.click(do_delete, inputs={name, styles}, outputs={styles, name, message}, **quiet)
    return styles
