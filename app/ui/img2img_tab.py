"""img2img tab: img2img, sketch, inpaint (mask drawn on the image), inpaint upload (image + mask
files) and outpainting, with A1111's inpaint options; jobs are :class:`Img2ImgRequest`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui import controlnet_units, generation_controls, presets_tab, results_panel
from app.ui.checked_images import CheckedImage, CheckedImageEditor, readable
from app.ui.generation_controls import GenerationControls, slider
from app.ui.images import encode_png, flatten
from app.ui.job_runner import GPU_CONCURRENCY_ID, GPU_EVENT_LIMIT
from app.ui.results_panel import ResultsPanel
from app.ui.txt2img_tab import build_header, make_runner, wire_run_controls
from contract.images import Img2ImgRequest

if TYPE_CHECKING:
    from PIL import Image

    from app.services import StudioServices

PREFIX = "img2img"
MODES = {
    "img2img": "img2img",
    "sketch": "Sketch",
    "inpaint": "Inpaint",
    "inpaint_upload": "Inpaint upload",
}
INPAINT_MODES = ("inpaint", "inpaint_upload")
MODE_INPUTS = {
    "img2img": ("init_image",),
    "sketch": ("sketch",),
    "inpaint": ("inpaint",),
    "inpaint_upload": ("inpaint_image", "inpaint_mask"),
}
RESIZE_MODES = ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]
MASK_MODES = ["Inpaint masked", "Inpaint not masked"]
MASKED_CONTENT = ["fill", "original", "latent noise", "latent nothing"]
INPAINT_AREAS = ["Whole picture", "Only masked"]
OUTPAINT_FIELDS = {
    "outpaint_left": "Left",
    "outpaint_right": "Right",
    "outpaint_up": "Up",
    "outpaint_down": "Down",
}


@dataclass
class Img2ImgTab:
    controls: GenerationControls
    panel: ResultsPanel
    mode: Any  # gr.State: which sub-tab is active
    mode_tabs: Any
    inpaint_options: Any  # the "Inpainting" accordion, shown on the inpaint sub-tabs
    init_image: Any
    sketch: Any
    inpaint: Any
    inpaint_image: Any
    inpaint_mask: Any
    denoising_strength: Any


def mask_from_layers(editor: dict[str, Any]) -> Image.Image | None:
    """White wherever the user painted on any layer of the editor; None when nothing was painted."""
    from PIL import Image, ImageChops

    background = editor.get("background")
    layers = [layer for layer in editor.get("layers") or [] if layer is not None]
    if background is None or not layers:
        return None
    mask = Image.new("L", background.size, 0)
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, Image.Resampling.NEAREST)
        mask = ImageChops.lighter(mask, alpha.point(lambda value: 255 if value > 0 else 0))
    return mask if mask.getbbox() else None


def source_images(mode: str, data: dict[str, Any]) -> tuple[Image.Image, Image.Image | None]:
    """(init image, mask or None) for the active sub-tab; a missing or unreadable input is a
    ValueError that tells the user what to upload."""
    for key in MODE_INPUTS.get(mode, ()):
        readable(data.get(key))
    if mode == "sketch":
        editor = data["sketch"] or {}
        image = editor.get("composite") or editor.get("background")
        if image is None:
            raise ValueError("Sketch: upload an image to draw on first.")
        return flatten(image), None
    if mode == "inpaint":
        editor = data["inpaint"] or {}
        background = editor.get("background")
        if background is None:
            raise ValueError("Inpaint: upload an image first, then paint the area to change.")
        mask = mask_from_layers(editor)
        if mask is None:
            raise ValueError("Inpaint: paint over the area to change with the brush (white).")
        return flatten(background), mask
    if mode == "inpaint_upload":
        image, mask = data["inpaint_image"], data["inpaint_mask"]
        if image is None:
            raise ValueError("Inpaint upload: upload the image to change.")
        if mask is None:
            raise ValueError("Inpaint upload: upload a mask (white = change, black = keep).")
        return flatten(image), flatten(mask).convert("L")
    image = data["init_image"]
    if image is None:
        raise ValueError("img2img: upload an image first (drop it on the img2img tab).")
    return flatten(image), None


def _upload_image(label: str, elem_id: str, *, field: str, **extra: Any) -> Any:
    """An RGBA picture the user uploads or pastes (an unreadable file is reported by ``field``)."""
    return CheckedImage(
        label=label,
        type="pil",
        image_mode="RGBA",
        sources=["upload", "clipboard"],
        elem_id=elem_id,
        field=field,
        **extra,
    )


def build(services: StudioServices) -> Img2ImgTab:
    runner = make_runner(services)
    header = build_header(services, PREFIX)
    generate, interrupt, skip = header.generate, header.interrupt, header.skip
    mode = gr.State("img2img")
    extra: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs(elem_id=f"{PREFIX}_mode_tabs") as mode_tabs:
                with gr.Tab(MODES["img2img"], id="img2img") as tab_img2img:
                    init_image = _upload_image(
                        "Image for img2img", f"{PREFIX}_image", field="init image", height=420
                    )
                with gr.Tab(MODES["sketch"], id="sketch") as tab_sketch:
                    sketch = CheckedImageEditor(
                        field="sketch image",
                        label="Sketch on the image",
                        type="pil",
                        sources=["upload", "clipboard"],
                        elem_id=f"{PREFIX}_sketch",
                        height=420,
                    )
                with gr.Tab(MODES["inpaint"], id="inpaint") as tab_inpaint:
                    inpaint = CheckedImageEditor(
                        field="inpaint image",
                        label="Paint the area to change",
                        type="pil",
                        sources=["upload", "clipboard"],
                        brush=gr.Brush(colors=["#FFFFFF"], color_mode="fixed"),
                        layers=False,
                        elem_id=f"{PREFIX}_inpaint",
                        height=420,
                    )
                with gr.Tab(MODES["inpaint_upload"], id="inpaint_upload") as tab_upload, gr.Row():
                    inpaint_image = _upload_image("Image", f"{PREFIX}_inpaint_base", field="inpaint image")
                    inpaint_mask = _upload_image(
                        "Mask (white = change)", f"{PREFIX}_inpaint_mask", field="mask"
                    )
            resize_mode = gr.Radio(
                choices=list(enumerate_choices(RESIZE_MODES)),
                value=0,
                label="Resize mode",
                elem_id=f"{PREFIX}_resize_mode",
            )
            with gr.Accordion(
                "Inpainting", open=True, visible=False, elem_id=f"{PREFIX}_inpaint_options"
            ) as inpaint_options:
                extra["mask_blur"] = slider(
                    Img2ImgRequest, "mask_blur", "Mask blur", step=1, value=4, elem_id=f"{PREFIX}_mask_blur"
                )
                with gr.Row():
                    extra["inpainting_mask_invert"] = gr.Radio(
                        choices=list(enumerate_choices(MASK_MODES)), value=0, label="Mask mode"
                    )
                    extra["inpainting_fill"] = gr.Radio(
                        choices=list(enumerate_choices(MASKED_CONTENT)), value=1, label="Masked content"
                    )
                with gr.Row():
                    extra["inpaint_full_res"] = gr.Radio(
                        choices=[(INPAINT_AREAS[0], False), (INPAINT_AREAS[1], True)],
                        value=False,
                        label="Inpaint area",
                    )
                    extra["inpaint_full_res_padding"] = slider(
                        Img2ImgRequest,
                        "inpaint_full_res_padding",
                        "Only masked padding, pixels",
                        step=4,
                        value=32,
                    )
            for tab, name in (
                (tab_img2img, "img2img"),
                (tab_sketch, "sketch"),
                (tab_inpaint, "inpaint"),
                (tab_upload, "inpaint_upload"),
            ):
                tab.select(
                    lambda name=name: (name, gr.update(visible=name in INPAINT_MODES)),
                    outputs=[mode, inpaint_options],
                    queue=False,
                    show_progress="hidden",
                )
            with gr.Accordion("Outpainting", open=False, elem_id=f"{PREFIX}_outpaint"):
                gr.Markdown("Pixels to add on each side; the new area is generated to match the image.")
                with gr.Row():
                    for name, label in OUTPAINT_FIELDS.items():
                        extra[name] = slider(Img2ImgRequest, name, label, step=8, elem_id=f"{PREFIX}_{name}")

            def denoising_controls() -> None:
                with gr.Row(equal_height=True):
                    extra["denoising_strength"] = slider(
                        Img2ImgRequest,
                        "denoising_strength",
                        "Denoising strength",
                        step=0.01,
                        elem_id=f"{PREFIX}_denoising_strength",
                        scale=4,
                    )
                    extra["detect_size"] = gr.Button(
                        "📐 Detect size", size="sm", elem_id=f"{PREFIX}_detect_size", scale=0, min_width=120
                    )

            controls = generation_controls.build_parameters(
                services,
                Img2ImgRequest,
                PREFIX,
                **header.parameter_components(),
                extra=denoising_controls,
            )
            detect_size = extra.pop("detect_size")
            extra["resize_mode"] = resize_mode
            controls.fields.update(extra)
            controlnet = controlnet_units.build(
                services, PREFIX, width=controls.width, height=controls.height
            )
            save_as_preset = presets_tab.build_save_as_preset(PREFIX)
        with gr.Column(scale=1):
            panel = results_panel.build(PREFIX)

    image_inputs = {"init_image": init_image, "sketch": sketch, "inpaint": inpaint}
    image_inputs |= {"inpaint_image": inpaint_image, "inpaint_mask": inpaint_mask}

    def request_values(data: dict[Any, Any]) -> dict[str, Any]:
        """The request's settings, without the source image and mask."""
        values = controls.request_values(data)
        values.update(controlnet.request_values(data, Img2ImgRequest))
        return values

    def generate_images(data: dict[Any, Any], request: gr.Request) -> Any:
        def build_requests() -> list[Any]:
            active = data[mode]
            image, mask = source_images(active, {key: data[c] for key, c in image_inputs.items()})
            values = request_values(data)
            values["init_images"] = [encode_png(image)]
            values["mask"] = encode_png(mask) if mask is not None else None
            return [Img2ImgRequest(**values)]

        yield from panel.stream(runner, data[panel.state], build_requests, request)

    def detect_image_size(data: dict[Any, Any]) -> dict[Any, Any]:
        try:
            image, _ = source_images(data[mode], {key: data[c] for key, c in image_inputs.items()})
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        width, height = (max(64, value - value % 8) for value in image.size)
        return {controls.width: width, controls.height: height}

    generate.click(
        generate_images,
        inputs={*controls.inputs, *controlnet.inputs, *image_inputs.values(), mode, panel.state},
        outputs=panel.outputs,
        concurrency_id=GPU_CONCURRENCY_ID,
        concurrency_limit=GPU_EVENT_LIMIT,
        show_progress="hidden",
        api_name="img2img",
    )
    detect_size.click(
        detect_image_size,
        inputs={mode, *image_inputs.values()},
        outputs={controls.width, controls.height},
        show_progress="hidden",
    )
    wire_run_controls(runner, panel, controls, interrupt, skip)
    presets_tab.wire_save_as_preset(
        services, save_as_preset, "img2img", request_values, {*controls.inputs, *controlnet.inputs}
    )
    return Img2ImgTab(
        controls=controls,
        panel=panel,
        mode=mode,
        mode_tabs=mode_tabs,
        inpaint_options=inpaint_options,
        init_image=init_image,
        sketch=sketch,
        inpaint=inpaint,
        inpaint_image=inpaint_image,
        inpaint_mask=inpaint_mask,
        denoising_strength=extra["denoising_strength"],
    )


def enumerate_choices(labels: list[str]) -> list[tuple[str, int]]:
    """Radio choices shown by label, valued by index (the request fields are A1111's indices)."""
    return [(label, index) for index, label in enumerate(labels)]
