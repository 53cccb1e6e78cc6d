"""The Gradio UI: one module per tab, each exporting ``build(services)``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.services import StudioServices


def build_ui(services: StudioServices) -> Any:
    import gradio as gr

    from app.ui import txt2img_tab

    with gr.Blocks(title="SD Studio") as demo:
        gr.Markdown("# SD Studio")
        with gr.Tab("txt2img"):
            txt2img_tab.build(services)
    return demo
