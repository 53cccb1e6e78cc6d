"""txt2img tab: prompts, styles, sampler, size, seed, batch, hires fix and ControlNet units.

Generate queues a :class:`Txt2ImgRequest` for this user and streams the run into the results
panel (progress, live preview, gallery, infotext).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui import (
    controlnet_units,
    download_panel,
    extra_networks_panel,
    generation_controls,
    presets_tab,
    results_panel,
    styles_panel,
)
from app.ui.generation_controls import GenerationControls, field_range, slider
from app.ui.job_runner import GPU_CONCURRENCY_ID, GPU_EVENT_LIMIT, JobRunner, TabSession
from app.ui.results_panel import ResultsPanel
from contract.images import RANDOM_SEED, Txt2ImgRequest

if TYPE_CHECKING:
    from app.services import StudioServices

PREFIX = "txt2img"
HIRES_FIELDS = (
    "enable_hr",
    "hr_upscaler",
    "hr_second_pass_steps",
    "denoising_strength",
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
)
DEFAULT_HIRES_DENOISING = 0.7


@dataclass
class Txt2ImgTab:
    controls: GenerationControls
    panel: ResultsPanel
    generate: Any
    interrupt: Any
    skip: Any


def hires_upscaler_choices(services: StudioServices) -> list[str]:
    """Latent modes first (no model needed), then built-in and model upscalers, as in A1111."""
    from pipelines.generation.engine import LATENT_UPSCALE_MODES
    from pipelines.postprocess.upscalers import list_upscalers

    names = list(LATENT_UPSCALE_MODES)
    names += [info.name for info in list_upscalers(services.settings.models_dir) if info.name != "None"]
    return names


def make_runner(services: StudioServices) -> JobRunner:
    return JobRunner(services)


def build_action_buttons(prefix: str) -> tuple[Any, Any, Any]:
    generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}_generate", size="lg")
    with gr.Row():
        interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt", size="sm", variant="stop")
        skip = gr.Button("Skip", elem_id=f"{prefix}_skip", size="sm")
    return generate, interrupt, skip


@dataclass
class TabHeader:
    """The top of a generation tab: model row, prompts, Generate/Interrupt/Skip and styles."""

    checkpoint: Any
    vae: Any
    refresh: Any
    prompt: Any
    negative: Any
    generate: Any
    interrupt: Any
    skip: Any
    styles: Any

    def parameter_components(self) -> dict[str, Any]:
        """What :func:`generation_controls.build_parameters` takes from the header."""
        return {
            "checkpoint": self.checkpoint,
            "vae": self.vae,
            "refresh": self.refresh,
            "prompt": self.prompt,
            "negative_prompt": self.negative,
            "styles": self.styles,
        }


def build_header(services: StudioServices, prefix: str) -> TabHeader:
    checkpoint, vae, refresh = generation_controls.build_model_row(services, prefix)
    generation_controls.build_no_models_notice(services)
    with gr.Row():
        with gr.Column(scale=5):
            prompt, negative = generation_controls.build_prompts(prefix)
        with gr.Column(scale=2, min_width=260):
            generate, interrupt, skip = build_action_buttons(prefix)
            styles = styles_panel.build(services, prefix, prompt, negative)
    extra_networks_panel.build(services, prefix, checkpoint)  # cards that insert <lora:...> tags
    return TabHeader(checkpoint, vae, refresh, prompt, negative, generate, interrupt, skip, styles)


def wire_run_controls(
    runner: JobRunner, panel: ResultsPanel, controls: GenerationControls, interrupt: Any, skip: Any
) -> None:
    """Interrupt/Skip act on this session's jobs; ♻️ puts back the last seed."""

    def do_interrupt(data: dict[Any, Any]) -> None:
        runner.interrupt(data[panel.state])

    def do_skip(data: dict[Any, Any]) -> None:
        runner.skip(data[panel.state])

    def reuse_seed(data: dict[Any, Any]) -> Any:
        session: TabSession = data[panel.state]
        chosen = session.selected_image()
        seed = chosen.seed if chosen and chosen.seed is not None else session.last_seed
        return RANDOM_SEED if seed is None else seed

    quiet: dict[str, Any] = {"show_progress": "hidden", "concurrency_limit": None}
    interrupt.click(do_interrupt, inputs={panel.state}, **quiet)
    skip.click(do_skip, inputs={panel.state}, **quiet)
    controls.reuse_seed.click(reuse_seed, inputs={panel.state}, outputs=controls.seed, **quiet)


def build(services: StudioServices) -> Txt2ImgTab:
    runner = make_runner(services)
    header = build_header(services, PREFIX)
    checkpoint, generate, interrupt, skip = header.checkpoint, header.generate, header.interrupt, header.skip
    hires: dict[str, Any] = {}

    def hires_controls() -> None:
        with gr.Accordion("Hires. fix", open=False, elem_id=f"{PREFIX}_hires_fix"):
            hires["enable_hr"] = gr.Checkbox(label="Hires. fix", value=False, elem_id=f"{PREFIX}_enable_hr")
            with gr.Row():
                hires["hr_upscaler"] = gr.Dropdown(
                    choices=hires_upscaler_choices(services), value="Latent", label="Upscaler"
                )
                hires["hr_second_pass_steps"] = slider(
                    Txt2ImgRequest, "hr_second_pass_steps", "Hires steps", step=1
                )
                hires["denoising_strength"] = gr.Slider(
                    label="Denoising strength",
                    step=0.01,
                    value=DEFAULT_HIRES_DENOISING,
                    **field_range(Txt2ImgRequest, "denoising_strength"),
                )
            with gr.Row():
                hires["hr_scale"] = slider(Txt2ImgRequest, "hr_scale", "Upscale by", step=0.05)
                hires["hr_resize_x"] = slider(Txt2ImgRequest, "hr_resize_x", "Resize width to", step=8)
                hires["hr_resize_y"] = slider(Txt2ImgRequest, "hr_resize_y", "Resize height to", step=8)

    with gr.Row():
        with gr.Column(scale=1):
            controls = generation_controls.build_parameters(
                services,
                Txt2ImgRequest,
                PREFIX,
                **header.parameter_components(),
                extra=hires_controls,
            )
            controls.fields.update(hires)
            controlnet = controlnet_units.build(
                services, PREFIX, width=controls.width, height=controls.height
            )
            download_panel.build(
                services,
                after_download=lambda: gr.update(
                    choices=generation_controls.checkpoint_choices(services),
                    value=generation_controls.default_checkpoint_choice(services),
                ),
                refreshed=checkpoint,
            )
            save_as_preset = presets_tab.build_save_as_preset(PREFIX)
        with gr.Column(scale=1):
            panel = results_panel.build(PREFIX)

    def request_values(data: dict[Any, Any]) -> dict[str, Any]:
        values = controls.request_values(data)
        if not values.get("enable_hr"):
            for name in HIRES_FIELDS:
                values.pop(name, None)
        values.update(controlnet.request_values(data, Txt2ImgRequest))
        return values

    def generate_images(data: dict[Any, Any], request: gr.Request) -> Any:
        def build_requests() -> list[Any]:
            return [Txt2ImgRequest(**request_values(data))]

        yield from panel.stream(runner, data[panel.state], build_requests, request)

    generate.click(
        generate_images,
        inputs={*controls.inputs, *controlnet.inputs, panel.state},
        outputs=panel.outputs,
        concurrency_id=GPU_CONCURRENCY_ID,
        concurrency_limit=GPU_EVENT_LIMIT,
        show_progress="hidden",
        api_name="txt2img",
    )
    wire_run_controls(runner, panel, controls, interrupt, skip)
    presets_tab.wire_save_as_preset(
        services, save_as_preset, "txt2img", request_values, {*controls.inputs, *controlnet.inputs}
    )
    return Txt2ImgTab(controls=controls, panel=panel, generate=generate, interrupt=interrupt, skip=skip)
