"""txt2img tab: prompt, sampler and size controls with ranges read from ``Txt2ImgRequest``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipelines.errors import StudioError
from pipelines.requests import Txt2ImgRequest, format_validation_error

if TYPE_CHECKING:
    from app.services import StudioServices


def _bounds(field: str) -> dict[str, Any]:
    """Slider min/max from the request model's Field(ge=..., le=...) constraints."""
    info = Txt2ImgRequest.model_fields[field]
    bounds: dict[str, Any] = {"value": info.default}
    for item in info.metadata:
        if hasattr(item, "ge"):
            bounds["minimum"] = item.ge
        if hasattr(item, "le"):
            bounds["maximum"] = item.le
    return bounds


def _checkpoint_choices(services: StudioServices) -> list[str]:
    return [entry.filename for entry in services.registry.checkpoints()]


def build(services: StudioServices) -> None:
    import gradio as gr

    from app.ui import download_panel
    from pipelines.registry import no_checkpoints_message
    from pipelines.samplers import SAMPLER_NAMES, SCHEDULE_TYPES

    choices = _checkpoint_choices(services)
    with gr.Row():
        model = gr.Dropdown(
            choices=choices, value=choices[0] if choices else None, label="Stable Diffusion checkpoint"
        )
        refresh = gr.Button("🔄", scale=0)
    no_models = gr.Markdown(
        ""
        if choices
        else "```\n" + no_checkpoints_message(services.registry.paths.folder("checkpoint")) + "\n```",
        visible=not choices,
    )
    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a photo of an astronaut riding a horse")
    negative = gr.Textbox(label="Negative prompt", lines=2)
    with gr.Row():
        sampler = gr.Dropdown(choices=list(SAMPLER_NAMES), value="Euler a", label="Sampling method")
        scheduler = gr.Dropdown(choices=list(SCHEDULE_TYPES), value="Automatic", label="Schedule type")
        steps = gr.Slider(label="Sampling steps", step=1, **{**_bounds("steps"), "value": 20})
    with gr.Row():
        width = gr.Slider(label="Width", step=8, minimum=64, maximum=2048, value=512)
        height = gr.Slider(label="Height", step=8, minimum=64, maximum=2048, value=512)
        cfg = gr.Slider(label="CFG Scale", step=0.5, **_bounds("cfg_scale"))
    with gr.Row():
        seed = gr.Number(label="Seed", value=-1, precision=0)
        batch_count = gr.Slider(label="Batch count", step=1, minimum=1, maximum=100, value=1)
        batch_size = gr.Slider(label="Batch size", step=1, minimum=1, maximum=8, value=1)
    generate = gr.Button("Generate", variant="primary")
    gallery = gr.Gallery(label="Output", columns=4, height="auto")
    infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False)

    def refresh_models() -> Any:
        services.registry.refresh("checkpoint")
        names = _checkpoint_choices(services)
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    def run(data: dict[Any, Any], progress: gr.Progress = gr.Progress()) -> tuple[list[tuple[str, str]], str]:  # noqa: B008
        try:
            request = Txt2ImgRequest(
                prompt=data[prompt],
                negative_prompt=data[negative],
                sampler_name=data[sampler],
                scheduler=data[scheduler],
                steps=int(data[steps]),
                cfg_scale=float(data[cfg]),
                width=int(data[width]),
                height=int(data[height]),
                seed=int(data[seed] if data[seed] is not None else -1),
                n_iter=int(data[batch_count]),
                batch_size=int(data[batch_size]),
                override_settings={"sd_model_checkpoint": data[model]} if data[model] else {},
            )
        except ValidationError as exc:
            raise gr.Error(format_validation_error(exc)) from None

        def on_progress(event: Any) -> None:
            if event.stage == "loading":
                progress(0.0, desc=event.message or "Loading model...")
            elif event.stage == "sampling":
                progress(event.fraction, desc=f"Step {event.step}/{event.steps}")

        try:
            result = services.executor.execute(request, on_progress=on_progress)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None
        images = [(str(img.path), f"seed {img.seed}") for img in result.images]
        return images, result.images[0].infotext if result.images else ""

    refresh.click(refresh_models, outputs=model)
    download_panel.build(services, after_download=refresh_models, refreshed=model)
    generate.click(
        run,
        inputs={
            model,
            prompt,
            negative,
            sampler,
            scheduler,
            steps,
            cfg,
            width,
            height,
            seed,
            batch_count,
            batch_size,
        },
        outputs=[gallery, infotext],
        concurrency_id="gpu",
    )
    _ = no_models
