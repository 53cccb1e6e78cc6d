"""The generation controls txt2img and img2img share: model row, prompts, styles, sampler, size,
seed and batch, with A1111's labels and ranges read from the request models' ``Field`` bounds.

``GenerationControls.fields`` maps request field names to components. Building a request and
pasting an infotext both go through that one table, so a control added there is at once sent
with every job and filled by "send to txt2img/img2img".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr
from pydantic import BaseModel

from contract.images import MAX_SEED, RANDOM_SEED, GenerationRequest
from pipelines.errors import ModelNotFoundError

if TYPE_CHECKING:
    from app.services import StudioServices

AUTOMATIC_VAE = "Automatic"
# Fields the UI sends only when the "Extra" seed options are ticked (A1111 does the same).
VARIATION_FIELDS = ("subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h")


def field_range(model: type[BaseModel], name: str) -> dict[str, Any]:
    """``minimum``/``maximum`` for a slider from the field's ``ge``/``le`` (``gt``/``lt`` too)."""
    info = model.model_fields[name]
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for attribute, key in (("ge", "minimum"), ("gt", "minimum"), ("le", "maximum"), ("lt", "maximum")):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds[key] = value
    return bounds


def field_default(model: type[BaseModel], name: str, fallback: Any = None) -> Any:
    default = model.model_fields[name].default
    return fallback if default is None else default


def slider(
    model: type[BaseModel], name: str, label: str, *, step: float, value: Any = None, **kwargs: Any
) -> Any:
    """A slider whose range is the request field's bounds and whose value defaults to its default."""
    return gr.Slider(
        label=label,
        step=step,
        value=field_default(model, name) if value is None else value,
        **field_range(model, name),
        **kwargs,
    )


def checkpoint_choices(services: StudioServices) -> list[str]:
    return [entry.filename for entry in services.registry.checkpoints()]


def vae_choices(services: StudioServices) -> list[str]:
    return [AUTOMATIC_VAE, *(entry.filename for entry in services.registry.list("vae"))]


def default_checkpoint_choice(services: StudioServices) -> str | None:
    """The model the dropdown starts on: the loaded one, else the configured default, else the first."""
    choices = checkpoint_choices(services)
    current = services.current_checkpoint()  # a title: "name.safetensors [hash]"
    for choice in choices:
        if current and (current == choice or current.startswith(f"{choice} [")):
            return choice
    preferred = services.selected_checkpoint
    if preferred:
        try:
            entry = services.registry.find("checkpoint", preferred)
        except ModelNotFoundError:
            entry = None
        if entry is not None and entry.filename in choices:
            return entry.filename
    return choices[0] if choices else None


def schedule_choices(sampler: str | None) -> list[str]:
    from contract.samplers import SCHEDULE_TYPES, UnknownSamplerError, schedule_types_for

    try:
        return list(schedule_types_for(sampler or "Euler"))
    except UnknownSamplerError:
        return list(SCHEDULE_TYPES)


@dataclass
class GenerationControls:
    """Components of the shared block; ``fields`` is request field name -> component."""

    prefix: str
    checkpoint: Any
    vae: Any
    refresh_models: Any
    prompt: Any
    negative_prompt: Any
    styles: Any
    sampler_name: Any
    scheduler: Any
    steps: Any
    width: Any
    height: Any
    cfg_scale: Any
    seed: Any
    random_seed: Any
    reuse_seed: Any
    extra_seed: Any
    subseed: Any
    subseed_strength: Any
    n_iter: Any
    batch_size: Any
    clip_skip: Any
    restore_faces: Any = None
    tiling: Any = None
    cache_interval: Any = None
    token_merging_ratio: Any = None
    fast_decode: Any = None
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "prompt",
            "negative_prompt",
            "styles",
            "sampler_name",
            "scheduler",
            "steps",
            "width",
            "height",
            "cfg_scale",
            "seed",
            "subseed",
            "subseed_strength",
            "n_iter",
            "batch_size",
            "clip_skip",
            "restore_faces",
            "tiling",
            "cache_interval",
            "token_merging_ratio",
            "fast_decode",
        ):
            if getattr(self, name) is not None:
                self.fields.setdefault(name, getattr(self, name))

    @property
    def inputs(self) -> set[Any]:
        """Every component a request is built from."""
        return {*self.fields.values(), self.checkpoint, self.vae, self.extra_seed}

    def request_values(self, data: dict[Any, Any]) -> dict[str, Any]:
        """Request fields from an event's input dict; empty values are left to the model's defaults."""
        values: dict[str, Any] = {}
        for name, component in self.fields.items():
            value = data.get(component)
            if value is None:
                continue
            if name in VARIATION_FIELDS and not data.get(self.extra_seed):
                continue
            values[name] = value
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"])
        overrides: dict[str, Any] = {}
        if data.get(self.checkpoint):
            overrides["sd_model_checkpoint"] = data[self.checkpoint]
        vae = data.get(self.vae)
        if vae and vae != AUTOMATIC_VAE:
            overrides["sd_vae"] = vae
        if overrides:
            values["override_settings"] = overrides
        return values

    def paste(self, services: StudioServices, fields: dict[str, Any]) -> tuple[dict[Any, Any], list[str]]:
        """Component updates for request fields read from an infotext, and notes on what could not
        be applied (an unknown model...). Fields without a control here are ignored."""
        updates: dict[Any, Any] = {}
        notes: list[str] = []
        for name, value in fields.items():
            component = self.fields.get(name)
            if component is None or value is None:
                continue
            updates[component] = gr.update(value=value)
        if "sampler_name" in fields:
            sampler = str(fields["sampler_name"])
            choices = schedule_choices(sampler)
            schedule = fields.get("scheduler") or "Automatic"
            updates[self.scheduler] = gr.update(
                choices=choices, value=schedule if schedule in choices else choices[0]
            )
        updates[self.extra_seed] = gr.update(value=bool(fields.get("subseed_strength")))
        overrides = fields.get("override_settings") or {}
        model = overrides.get("sd_model_checkpoint") if isinstance(overrides, dict) else None
        if model:
            try:
                entry = services.registry.find("checkpoint", str(model))
                updates[self.checkpoint] = gr.update(value=entry.filename)
            except ModelNotFoundError:
                notes.append(
                    f"Model '{model}' from the parameters is not in the models folder; kept the current one."
                )
        vae = overrides.get("sd_vae") if isinstance(overrides, dict) else None
        if vae:
            try:
                entry = services.registry.find("vae", str(vae))
                updates[self.vae] = gr.update(value=entry.filename)
            except ModelNotFoundError:
                notes.append(
                    f"VAE '{vae}' from the parameters is not in the VAE folder; kept the current one."
                )
        return updates, notes


def build_model_row(services: StudioServices, prefix: str) -> tuple[Any, Any, Any]:
    """Checkpoint and VAE dropdowns with a refresh button (A1111's quicksettings row)."""
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(
            choices=checkpoint_choices(services),
            value=lambda: default_checkpoint_choice(services),
            label="Stable Diffusion checkpoint",
            elem_id=f"{prefix}_checkpoint",
            scale=4,
        )
        vae = gr.Dropdown(
            choices=vae_choices(services),
            value=AUTOMATIC_VAE,
            label="SD VAE",
            elem_id=f"{prefix}_vae",
            scale=2,
        )
        refresh = gr.Button(
            "🔄 Refresh", size="sm", elem_id=f"{prefix}_refresh_models", scale=0, min_width=100
        )

    def refresh_models() -> tuple[Any, Any]:
        services.registry.refresh("checkpoint")
        services.registry.refresh("vae")
        names = checkpoint_choices(services)
        return gr.update(choices=names, value=default_checkpoint_choice(services)), gr.update(
            choices=vae_choices(services)
        )

    refresh.click(refresh_models, outputs=[checkpoint, vae], concurrency_limit=None, show_progress="hidden")
    return checkpoint, vae, refresh


def build_no_models_notice(services: StudioServices) -> None:
    """When ``models/Stable-diffusion`` is empty, say where to put a model (and how to get one)."""
    from pipelines.models.registry import no_checkpoints_message

    if checkpoint_choices(services):
        return
    folder = services.registry.paths.folder("checkpoint")
    gr.Markdown("```\n" + no_checkpoints_message(folder) + "\n```", elem_id="no_models_notice")


def build_prompts(prefix: str) -> tuple[Any, Any]:
    prompt = gr.Textbox(
        label="Prompt",
        lines=3,
        placeholder="Prompt (A1111 syntax: (word:1.2), [word], BREAK)",
        elem_id=f"{prefix}_prompt",
    )
    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_negative_prompt")
    return prompt, negative


def build_parameters(
    services: StudioServices,
    model: type[GenerationRequest],
    prefix: str,
    *,
    checkpoint: Any,
    vae: Any,
    refresh: Any,
    prompt: Any,
    negative_prompt: Any,
    styles: Any,
    extra: Callable[[], None] | None = None,
) -> GenerationControls:
    """Sampler, size, batch, CFG and seed controls; ``extra`` renders tab-specific controls
    (hires fix, denoising strength) between the sampler and the size rows."""
    from contract.samplers import SAMPLER_NAMES

    with gr.Row():
        sampler = gr.Dropdown(
            choices=list(SAMPLER_NAMES),
            value=lambda: services.settings.default_sampler,
            label="Sampling method",
            elem_id=f"{prefix}_sampler",
        )
        scheduler = gr.Dropdown(
            choices=schedule_choices(services.settings.default_sampler),
            value=lambda: services.settings.default_scheduler,
            label="Schedule type",
            elem_id=f"{prefix}_scheduler",
        )
    steps = slider(model, "steps", "Sampling steps", step=1, value=20, elem_id=f"{prefix}_steps")
    if extra is not None:
        extra()
    with gr.Row(equal_height=True):
        with gr.Column(scale=4):
            width = slider(model, "width", "Width", step=8, elem_id=f"{prefix}_width")
            height = slider(model, "height", "Height", step=8, elem_id=f"{prefix}_height")
        swap = gr.Button("⇅ Swap", size="sm", elem_id=f"{prefix}_swap_size", scale=0, min_width=80)
        with gr.Column(scale=2):
            n_iter = slider(model, "n_iter", "Batch count", step=1, elem_id=f"{prefix}_batch_count")
            batch_size = slider(model, "batch_size", "Batch size", step=1, elem_id=f"{prefix}_batch_size")
    cfg_scale = slider(model, "cfg_scale", "CFG Scale", step=0.5, elem_id=f"{prefix}_cfg_scale")
    with gr.Row(equal_height=True):
        seed = gr.Number(
            label="Seed",
            value=RANDOM_SEED,
            precision=0,
            minimum=RANDOM_SEED,
            maximum=MAX_SEED,
            elem_id=f"{prefix}_seed",
            scale=4,
        )
        random_seed = gr.Button(
            "🎲 Random", size="sm", elem_id=f"{prefix}_random_seed", scale=0, min_width=100
        )
        reuse_seed = gr.Button("♻️ Reuse", size="sm", elem_id=f"{prefix}_reuse_seed", scale=0, min_width=90)
        extra_seed = gr.Checkbox(label="Extra", value=False, elem_id=f"{prefix}_extra_seed", scale=1)
    with gr.Row(visible=False) as variation_row:
        subseed = gr.Number(
            label="Variation seed",
            value=RANDOM_SEED,
            precision=0,
            minimum=RANDOM_SEED,
            maximum=MAX_SEED,
            elem_id=f"{prefix}_subseed",
        )
        subseed_strength = slider(
            model, "subseed_strength", "Variation strength", step=0.01, elem_id=f"{prefix}_subseed_strength"
        )
    with gr.Accordion("Advanced", open=False):
        clip_skip = slider(model, "clip_skip", "Clip skip", step=1, elem_id=f"{prefix}_clip_skip")
        with gr.Row():
            restore_faces = gr.Checkbox(
                label="Restore faces (GFPGAN)", value=False, elem_id=f"{prefix}_restore_faces"
            )
            tiling = gr.Checkbox(label="Tiling (seamless)", value=False, elem_id=f"{prefix}_tiling")
        speed = build_speed_controls(services, model, prefix)

    swap.click(lambda w, h: (h, w), inputs=[width, height], outputs=[width, height], show_progress="hidden")
    random_seed.click(lambda: RANDOM_SEED, outputs=seed, show_progress="hidden", queue=False)
    extra_seed.change(lambda on: gr.update(visible=on), inputs=extra_seed, outputs=variation_row, queue=False)
    sampler.change(
        lambda name, current: gr.update(
            choices=schedule_choices(name),
            value=current if current in schedule_choices(name) else schedule_choices(name)[0],
        ),
        inputs=[sampler, scheduler],
        outputs=scheduler,
        show_progress="hidden",
        queue=False,
    )
    return GenerationControls(
        prefix=prefix,
        checkpoint=checkpoint,
        vae=vae,
        refresh_models=refresh,
        prompt=prompt,
        negative_prompt=negative_prompt,
        styles=styles,
        sampler_name=sampler,
        scheduler=scheduler,
        steps=steps,
        width=width,
        height=height,
        cfg_scale=cfg_scale,
        seed=seed,
        random_seed=random_seed,
        reuse_seed=reuse_seed,
        extra_seed=extra_seed,
        subseed=subseed,
        subseed_strength=subseed_strength,
        n_iter=n_iter,
        batch_size=batch_size,
        clip_skip=clip_skip,
        restore_faces=restore_faces,
        tiling=tiling,
        **speed,
    )


def build_speed_controls(
    services: StudioServices, model: type[GenerationRequest], prefix: str
) -> dict[str, Any]:
    """This job's speed options, starting from the studio's defaults (Settings tab)."""
    with gr.Row():
        cache_interval = gr.Slider(
            label="Step caching: full UNet every N steps (1 = off)",
            step=1,
            value=lambda: services.settings.cache_interval,
            **field_range(model, "cache_interval"),
            elem_id=f"{prefix}_cache_interval",
        )
        token_merging_ratio = gr.Slider(
            label="Token merging ratio (0 = off)",
            step=0.05,
            value=lambda: services.settings.token_merging_ratio,
            **field_range(model, "token_merging_ratio"),
            elem_id=f"{prefix}_token_merging_ratio",
        )
        fast_decode = gr.Checkbox(
            label="Fast decode (TAESD, drafts)",
            value=lambda: services.settings.fast_decode,
            elem_id=f"{prefix}_fast_decode",
        )
    return {
        "cache_interval": cache_interval,
        "token_merging_ratio": token_merging_ratio,
        "fast_decode": fast_decode,
    }
