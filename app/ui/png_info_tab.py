"""PNG Info tab: drop an image, read the generation parameters stored in it (A1111's
``parameters`` text chunk or EXIF comment), and send them to txt2img / img2img / inpaint."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

if TYPE_CHECKING:
    from app.services import StudioServices

PREFIX = "pnginfo"


@dataclass
class PngInfoTab:
    image: Any  # gr.Image, type="filepath": the uploaded file itself, metadata intact
    parameters: Any  # gr.Textbox with the raw infotext
    send_buttons: dict[str, Any]


def describe_image(path: str | None) -> tuple[str, str]:
    """(infotext, HTML table of everything else readable) for an uploaded file."""
    from PIL import Image, UnidentifiedImageError

    from pipelines.outputs.saving import read_png_parameters

    if not path:
        return "", ""
    try:
        with Image.open(path) as image:
            image.load()
            size, mode, file_format = image.size, image.mode, image.format
            other = {
                str(key): str(value)
                for key, value in image.info.items()
                if key != "parameters" and isinstance(value, (str, int, float))
            }
        parameters = read_png_parameters(Path(path)) or ""
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise gr.Error(
            f"PNG Info: cannot read this file as an image ({exc}).", print_exception=False
        ) from None
    rows = [("Format", f"{file_format} {size[0]}x{size[1]} {mode}"), *other.items()]
    if parameters:
        from pipelines.outputs.infotext import parse_infotext

        rows += list(parse_infotext(parameters).params.items())
    table = "".join(
        f"<tr><th>{html.escape(key)}</th><td>{html.escape(value[:500])}</td></tr>" for key, value in rows
    )
    note = "" if parameters else "<p>No generation parameters found in this image.</p>"
    return parameters, f'{note}<table class="sd-pnginfo">{table}</table>'


def build(services: StudioServices) -> PngInfoTab:
    """Render the tab; ``services`` is unused (reading metadata needs no model) but kept so every
    tab module has the same ``build(services)`` entry point."""
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Source",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id=f"{PREFIX}_image",
                height=420,
            )
        with gr.Column(scale=1):
            parameters = gr.Textbox(
                label="Parameters",
                lines=6,
                interactive=False,
                elem_id=f"{PREFIX}_parameters",
                buttons=["copy"],
            )
            send_buttons: dict[str, Any] = {}
            with gr.Row():
                for target, label in (
                    ("txt2img", "Send to txt2img"),
                    ("img2img", "Send to img2img"),
                    ("inpaint", "Send to inpaint"),
                    ("extras", "Send to extras"),
                ):
                    send_buttons[target] = gr.Button(label, size="sm", elem_id=f"{PREFIX}_send_to_{target}")
            details = gr.HTML("", elem_id=f"{PREFIX}_details")

    def read(path: str | None) -> tuple[str, str]:
        return describe_image(path)

    image.change(
        read, inputs=image, outputs=[parameters, details], show_progress="hidden", concurrency_limit=None
    )
    return PngInfoTab(image=image, parameters=parameters, send_buttons=send_buttons)
