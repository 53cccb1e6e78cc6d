"""Extras tab: upscale and restore faces, for one image, several uploaded images, or every image
in a folder on the studio machine. Each image is one :class:`ExtrasRequest` job on the queue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui import results_panel
from app.ui.checked_images import CheckedImage, check_uploaded_file, readable
from app.ui.generation_controls import field_default, slider
from app.ui.images import encode_png
from app.ui.job_runner import GPU_CONCURRENCY_ID, GPU_EVENT_LIMIT
from app.ui.results_panel import ResultsPanel
from app.ui.txt2img_tab import make_runner
from contract.images import ExtrasRequest

if TYPE_CHECKING:
    from app.services import StudioServices

PREFIX = "extras"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class ExtrasTab:
    panel: ResultsPanel
    image: Any
    mode_tabs: Any
    mode: Any


def upscaler_choices(services: StudioServices) -> list[str]:
    from pipelines.postprocess.upscalers import list_upscalers

    return [info.name for info in list_upscalers(services.settings.models_dir)]


def folder_images(folder: str, outputs_root: Path) -> list[Path]:
    """The images directly inside ``folder``, sorted by name; errors name the folder.

    Only folders inside the outputs folder are read (a relative path is taken from there): the UI
    may be served to a network, and the studio never reads other files of its machine for a page.
    """
    if not folder.strip():
        raise ValueError("Batch from directory: type the input folder's path.")
    root = Path(outputs_root).resolve()
    path = (root / Path(folder.strip()).expanduser()).resolve()
    if path != root and root not in path.parents:
        raise ValueError(
            f"Batch from directory reads folders inside the outputs folder ({root}) only; the studio "
            "does not read other files of its machine for the web page. Copy the images into a folder "
            f"there (e.g. {root / 'batch-input'}) and type that folder."
        )
    if not path.is_dir():
        raise ValueError(f"Batch from directory: {path} is not a folder on the studio machine.")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"Batch from directory: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}.")
    return images


def build(services: StudioServices) -> ExtrasTab:
    runner = make_runner(services)
    mode = gr.State("single")
    fields: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id=f"{PREFIX}_mode_tabs") as mode_tabs:
                with gr.Tab("Single Image", id="single") as tab_single:
                    image = CheckedImage(
                        field="Extras source image",
                        label="Source",
                        type="pil",
                        image_mode="RGBA",
                        sources=["upload", "clipboard"],
                        elem_id=f"{PREFIX}_image",
                        height=360,
                    )
                with gr.Tab("Batch Process", id="batch") as tab_batch:
                    files = gr.File(
                        label="Images", file_count="multiple", file_types=["image"], elem_id=f"{PREFIX}_files"
                    )
                with gr.Tab("Batch from Directory", id="folder") as tab_folder:
                    folder = gr.Textbox(
                        label="Input directory",
                        placeholder="A folder inside the outputs folder, e.g. batch-input",
                        elem_id=f"{PREFIX}_input_dir",
                    )
                    gr.Markdown(
                        "Reads a folder inside the studio's outputs folder (relative paths start there); "
                        "results are written to `extras/<date>`."
                    )
            for tab, name in ((tab_single, "single"), (tab_batch, "batch"), (tab_folder, "folder")):
                tab.select(lambda name=name: name, outputs=mode, queue=False, show_progress="hidden")
            with gr.Tabs():
                with gr.Tab("Scale by") as tab_scale_by:
                    fields["upscaling_resize"] = slider(
                        ExtrasRequest, "upscaling_resize", "Resize", step=0.05, elem_id=f"{PREFIX}_resize"
                    )
                with gr.Tab("Scale to") as tab_scale_to:
                    with gr.Row():
                        fields["upscaling_resize_w"] = slider(
                            ExtrasRequest, "upscaling_resize_w", "Width", step=8
                        )
                        fields["upscaling_resize_h"] = slider(
                            ExtrasRequest, "upscaling_resize_h", "Height", step=8
                        )
                    fields["upscaling_crop"] = gr.Checkbox(label="Crop to fit", value=True)
            resize_mode = gr.State(0)
            tab_scale_by.select(lambda: 0, outputs=resize_mode, queue=False, show_progress="hidden")
            tab_scale_to.select(lambda: 1, outputs=resize_mode, queue=False, show_progress="hidden")
            choices = upscaler_choices(services)
            with gr.Row():
                fields["upscaler_1"] = gr.Dropdown(
                    choices=choices,
                    value=field_default(ExtrasRequest, "upscaler_1"),
                    label="Upscaler 1",
                    elem_id=f"{PREFIX}_upscaler_1",
                )
                fields["upscaler_2"] = gr.Dropdown(
                    choices=choices, value=field_default(ExtrasRequest, "upscaler_2"), label="Upscaler 2"
                )
                refresh = gr.Button("🔄 Refresh", size="sm", scale=0, min_width=100)
            fields["extras_upscaler_2_visibility"] = slider(
                ExtrasRequest, "extras_upscaler_2_visibility", "Upscaler 2 visibility", step=0.01
            )
            with gr.Accordion("SD x4 upscaler settings (for 'SD x4 (...)' upscalers)", open=False):
                fields["sd_upscale_prompt"] = gr.Textbox(
                    label="Prompt", lines=2, placeholder="What the picture shows (optional)"
                )
                fields["sd_upscale_negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    fields["sd_upscale_noise_level"] = slider(
                        ExtrasRequest, "sd_upscale_noise_level", "Noise level", step=1
                    )
                    fields["sd_upscale_steps"] = slider(ExtrasRequest, "sd_upscale_steps", "Steps", step=1)
                with gr.Row():
                    fields["sd_upscale_cfg_scale"] = slider(
                        ExtrasRequest, "sd_upscale_cfg_scale", "CFG scale", step=0.5
                    )
                    fields["sd_upscale_seed"] = gr.Number(
                        label="Seed (-1: random)",
                        value=field_default(ExtrasRequest, "sd_upscale_seed"),
                        precision=0,
                    )
            with gr.Row():
                fields["gfpgan_visibility"] = slider(
                    ExtrasRequest,
                    "gfpgan_visibility",
                    "GFPGAN visibility",
                    step=0.01,
                    elem_id=f"{PREFIX}_gfpgan_visibility",
                )
                fields["codeformer_visibility"] = slider(
                    ExtrasRequest, "codeformer_visibility", "CodeFormer visibility", step=0.01
                )
                fields["codeformer_weight"] = slider(
                    ExtrasRequest, "codeformer_weight", "CodeFormer weight (0 = maximum effect)", step=0.01
                )
            fields["upscale_first"] = gr.Checkbox(label="Upscale before restoring faces", value=False)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id=f"{PREFIX}_generate")
                interrupt = gr.Button("Interrupt", variant="stop", elem_id=f"{PREFIX}_interrupt")
        with gr.Column(scale=1):
            panel = results_panel.build(PREFIX, send_targets=("img2img", "inpaint", "talking_head"))

    def sources(data: dict[Any, Any]) -> list[str]:
        active = data[mode]
        if active == "batch":
            uploaded = data[files] or []
            if not uploaded:
                raise ValueError("Batch Process: drop one or more images first.")
            return [
                check_uploaded_file("Batch Process image", str(getattr(item, "name", item)))
                for item in uploaded
            ]
        if active == "folder":
            return [str(path) for path in folder_images(data[folder] or "", services.settings.outputs_dir)]
        if readable(data[image]) is None:
            raise ValueError("Extras: upload an image first.")
        return [encode_png(data[image])]

    def run_extras(data: dict[Any, Any], request: gr.Request) -> Any:
        def build_requests() -> list[Any]:
            values = {
                name: data[component] for name, component in fields.items() if data[component] is not None
            }
            values["resize_mode"] = data[resize_mode]
            return [ExtrasRequest(image=source, **values) for source in sources(data)]

        yield from panel.stream(runner, data[panel.state], build_requests, request)

    def refresh_upscalers() -> tuple[Any, Any]:
        names = upscaler_choices(services)
        return gr.update(choices=names), gr.update(choices=names)

    generate.click(
        run_extras,
        inputs={*fields.values(), resize_mode, mode, image, files, folder, panel.state},
        outputs=panel.outputs,
        concurrency_id=GPU_CONCURRENCY_ID,
        concurrency_limit=GPU_EVENT_LIMIT,
        show_progress="hidden",
        api_name="extras",
    )
    interrupt.click(
        lambda data: runner.interrupt(data[panel.state]),
        inputs={panel.state},
        show_progress="hidden",
        concurrency_limit=None,
    )
    refresh.click(
        refresh_upscalers,
        outputs=[fields["upscaler_1"], fields["upscaler_2"]],
        show_progress="hidden",
        concurrency_limit=None,
    )
    return ExtrasTab(panel=panel, image=image, mode_tabs=mode_tabs, mode=mode)
