"""Settings tab: memory preset, attention backend, default sampler, live previews and the output
folder, saved to ``data/config.json`` and applied to the running studio where that is possible."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from pydantic import ValidationError

from app.settings import StudioSettings
from app.ui.generation_controls import field_range, schedule_choices
from contract.images import format_validation_error
from pipelines.generation.previews import PREVIEW_MODES

if TYPE_CHECKING:
    from app.services import StudioServices

PREFIX = "settings"
MEMORY_PRESETS = {
    "auto": "auto (pick by GPU memory)",
    "high": "high (everything on the GPU)",
    "medvram": "medvram (model CPU offload, 6-8 GB)",
    "lowvram": "lowvram (block group offload, 2-4 GB)",
    "lowvram-sequential": "lowvram-sequential (A1111's sequential offload, least VRAM)",
    "cpu": "cpu (no GPU)",
}
ATTENTION_BACKENDS = {
    "auto": "auto (xFormers when installed, else PyTorch SDPA)",
    "sdpa": "sdpa (PyTorch scaled dot product)",
    "xformers": "xformers",
    "slicing": "slicing (lowest memory, slowest)",
    "default": "default (diffusers' plain attention)",
}
SAVED_FIELDS = (
    "memory_preset",
    "attention",
    "default_sampler",
    "default_scheduler",
    "live_preview",
    "live_preview_every",
    "outputs_dir",
    "checkpoints_in_ram",
    "fp8_unet",
    "cache_interval",
    "token_merging_ratio",
    "fast_decode",
)


def apply_settings(services: StudioServices, changes: dict[str, Any]) -> list[str]:
    """Validate ``changes``, save them and apply what can change while running.

    Returns one line per effect for the user. Invalid values raise ``ValueError``/``ValidationError``
    before anything is saved.
    """
    from contract.samplers import resolve_sampler_name, resolve_schedule_type, schedule_types_for

    settings = services.settings
    sampler = resolve_sampler_name(str(changes["default_sampler"]))
    schedule = resolve_schedule_type(str(changes["default_scheduler"]))
    if schedule not in schedule_types_for(sampler):
        raise ValueError(
            f"Schedule type '{schedule}' is not available for '{sampler}'; "
            f"choose one of {', '.join(schedule_types_for(sampler))}."
        )
    changes = {**changes, "default_sampler": sampler, "default_scheduler": schedule}
    changes["outputs_dir"] = Path(str(changes["outputs_dir"]).strip()).expanduser()
    if settings.listen and Path(changes["outputs_dir"]) != Path(settings.outputs_dir):
        # The output folder is what the page may read files from: over a network that is for the
        # studio's admin to set (flag or config file), not for whoever has a login.
        raise ValueError(
            "The output folder cannot be changed from the page while the studio serves a network "
            "(--listen); set --outputs-dir or data/config.json on the studio machine."
        )
    # validate everything on a copy first: a bad value must not leave half the settings changed
    StudioSettings.model_validate({**settings.model_dump(), **changes})
    before = {name: getattr(settings, name) for name in SAVED_FIELDS}
    for name, value in changes.items():
        setattr(settings, name, value)
    settings.save(only=SAVED_FIELDS)
    lines = [f"Saved to {settings.config_file}."]

    memory_changed = (
        before["memory_preset"] != settings.memory_preset
        or before["attention"] != settings.attention
        or before["fp8_unet"] != settings.fp8_unet
    )
    if memory_changed:
        services.workers.apply_settings(settings)
        lines.append(
            f"Memory preset '{settings.memory_preset}' and attention '{settings.attention}' apply from "
            "the next job (the workers restart with them between jobs)."
        )
    speed = ("cache_interval", "token_merging_ratio", "fast_decode")
    if any(before[name] != getattr(settings, name) for name in speed):
        services.workers.apply_settings(settings)
        lines.append(
            f"Speed defaults: step caching every {settings.cache_interval} step(s), token merging "
            f"{settings.token_merging_ratio}, fast decode {'on' if settings.fast_decode else 'off'} "
            "(new pages start with them; a job's own values win)."
        )
    if before["checkpoints_in_ram"] != settings.checkpoints_in_ram:
        services.workers.apply_settings(settings)
        lines.append(f"Up to {settings.checkpoints_in_ram} checkpoint(s) stay loaded.")
    if (before["default_sampler"], before["default_scheduler"]) != (sampler, schedule):
        lines.append(f"New pages start with {sampler} / {schedule} (reload the page to use it here).")
    if (before["live_preview"], before["live_preview_every"]) != (
        settings.live_preview,
        settings.live_preview_every,
    ):
        lines.append(
            f"Live preview: {PREVIEW_MODES[settings.live_preview]}, "
            f"every {settings.live_preview_every} step(s)."
        )
    if Path(before["outputs_dir"]) != Path(settings.outputs_dir):
        lines.append(f"Output folder {settings.outputs_dir} is used after a restart of the studio.")
    return lines


def build(services: StudioServices) -> None:
    from contract.samplers import SAMPLER_NAMES

    settings = services.settings
    gr.Markdown(
        "Settings are shared by everyone using this studio and saved to "
        f"`{settings.config_file}`. Command-line flags still win at the next start."
    )
    components: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Memory and speed")
            components["memory_preset"] = gr.Dropdown(
                choices=[(label, name) for name, label in MEMORY_PRESETS.items()],
                value=lambda: services.settings.memory_preset,
                label="Memory preset",
                elem_id=f"{PREFIX}_memory_preset",
            )
            components["attention"] = gr.Dropdown(
                choices=[(label, name) for name, label in ATTENTION_BACKENDS.items()],
                value=lambda: services.settings.attention,
                label="Attention backend",
                elem_id=f"{PREFIX}_attention",
            )
            components["fp8_unet"] = gr.Checkbox(
                label="Store UNet weights in fp8 (about half the VRAM; reloads the model)",
                value=lambda: services.settings.fp8_unet,
                elem_id=f"{PREFIX}_fp8_unet",
            )
            components["cache_interval"] = gr.Slider(
                label="Step caching: full UNet every N steps (1 = off), default for new jobs",
                step=1,
                value=lambda: services.settings.cache_interval,
                **field_range(StudioSettings, "cache_interval"),
                elem_id=f"{PREFIX}_cache_interval",
            )
            components["token_merging_ratio"] = gr.Slider(
                label="Token merging ratio (0 = off), default for new jobs",
                step=0.05,
                value=lambda: services.settings.token_merging_ratio,
                **field_range(StudioSettings, "token_merging_ratio"),
                elem_id=f"{PREFIX}_token_merging_ratio",
            )
            components["fast_decode"] = gr.Checkbox(
                label="Fast decode with TAESD (drafts), default for new jobs",
                value=lambda: services.settings.fast_decode,
                elem_id=f"{PREFIX}_fast_decode",
            )
            components["checkpoints_in_ram"] = gr.Slider(
                label="Checkpoints kept in RAM",
                step=1,
                value=lambda: services.settings.checkpoints_in_ram,
                **field_range(StudioSettings, "checkpoints_in_ram"),
            )
        with gr.Column():
            gr.Markdown("### Sampling defaults")
            components["default_sampler"] = gr.Dropdown(
                choices=list(SAMPLER_NAMES),
                value=lambda: services.settings.default_sampler,
                label="Default sampling method",
                elem_id=f"{PREFIX}_default_sampler",
            )
            components["default_scheduler"] = gr.Dropdown(
                choices=schedule_choices(settings.default_sampler),
                value=lambda: services.settings.default_scheduler,
                label="Default schedule type",
                elem_id=f"{PREFIX}_default_scheduler",
            )
            gr.Markdown("### Live previews")
            components["live_preview"] = gr.Radio(
                choices=[(label, name) for name, label in PREVIEW_MODES.items()],
                value=lambda: services.settings.live_preview,
                label="Live preview mode",
                elem_id=f"{PREFIX}_live_preview",
            )
            components["live_preview_every"] = gr.Slider(
                label="Show a new preview every N sampling steps",
                step=1,
                value=lambda: services.settings.live_preview_every,
                **field_range(StudioSettings, "live_preview_every"),
                elem_id=f"{PREFIX}_live_preview_every",
            )
        with gr.Column():
            gr.Markdown("### Output")
            components["outputs_dir"] = gr.Textbox(
                label="Output folder (images go to <folder>/<mode>/<date>/)",
                value=lambda: str(services.settings.outputs_dir),
                interactive=not services.settings.listen,
                elem_id=f"{PREFIX}_outputs_dir",
            )
    with gr.Row():
        save = gr.Button("Apply settings", variant="primary", elem_id=f"{PREFIX}_apply")
    result = gr.Markdown("", elem_id=f"{PREFIX}_result")

    def save_settings(data: dict[Any, Any]) -> str:
        changes = {name: data[component] for name, component in components.items()}
        try:
            lines = apply_settings(services, changes)
        except ValidationError as exc:
            raise gr.Error(format_validation_error(exc), print_exception=False) from None
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return "\n".join(f"- {line}" for line in lines)

    def sampler_changed(name: str, current: str) -> Any:
        choices = schedule_choices(name)
        return gr.update(choices=choices, value=current if current in choices else choices[0])

    save.click(save_settings, inputs=set(components.values()), outputs=result, concurrency_limit=None)
    components["default_sampler"].change(
        sampler_changed,
        inputs=[components["default_sampler"], components["default_scheduler"]],
        outputs=components["default_scheduler"],
        show_progress="hidden",
        queue=False,
    )
