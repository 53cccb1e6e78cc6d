"""Presets tab: drop a photo, type a few words, Go; and "Save as preset".

Running a preset builds the same request the API and Discord build (``app/presets.py``) and puts it
on the queue through :class:`JobRunner`, so it shows progress and results like the other tabs.

"Save as preset" is in the txt2img and img2img tabs (their current settings, through
:func:`build_save_as_preset`); here it takes the parameters of your last txt2img or img2img job
("Load my last job's settings") or any A1111 request JSON pasted in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.presets import PresetStore, list_presets, preset_from_request, preset_request_for
from app.ui import results_panel
from app.ui.job_runner import (
    GPU_CONCURRENCY_ID,
    GPU_EVENT_LIMIT,
    JobRunner,
    RunUpdate,
    TabSession,
    job_owner,
    user_message,
)

if TYPE_CHECKING:
    from app.services import StudioServices

log = logging.getLogger(__name__)

PREFIX = "presets"
PHOTO_TYPES = [".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"]
_SKIPPED_FIELDS = ("init_images", "mask", "seed", "subseed")


def preset_names(services: StudioServices) -> list[str]:
    return PresetStore.for_services(services).names()


def preset_summary(services: StudioServices, name: str | None) -> str:
    """A few lines about the chosen preset (or why it cannot run)."""
    if not name:
        return "No preset chosen. Save one below, or put a YAML file in presets/ (see presets/README.md)."
    for item in list_presets(PresetStore.for_services(services), services.registry):
        if item["name"] == name:
            if not item.get("ready"):
                return f"**Not ready:** {item.get('error')}"
            photo = "needs a photo" if item.get("needs_photo") else "photo optional"
            size = f"longest side {item['longest_side']}px"
            return f"**{name}** ({item['mode']}, {photo}, {size}). {item['description']}"
    return f"No preset named {name}."


def run_preset(
    runner: JobRunner,
    session: TabSession,
    name: str | None,
    photo_path: str | None,
    words: str,
    seed: float | None,
    owner: str,
) -> Iterator[RunUpdate]:
    """Queue the preset run and follow it. With the preset's safety checker on, images are shown
    only once they have been screened."""
    services = runner.services
    if not name:
        raise ValueError("Choose a preset first.")
    photo = Path(photo_path).read_bytes() if photo_path else None
    chosen_seed = None if seed is None or int(seed) < 0 else int(seed)
    preset, request = preset_request_for(
        services, PresetStore.for_services(services), name, words, photo, seed=chosen_seed
    )
    runner.submit(session, [request], owner)
    for update in runner.follow(session):
        if preset.safety_checker:
            if not update.finished:
                update.images_changed = False
            else:
                from app.safety_checker import screen_files

                paths = [image.path for image in session.images]
                for path, flagged in zip(
                    paths, screen_files(services.settings.models_dir, paths), strict=True
                ):
                    if flagged:
                        session.notes.append(f"The safety checker held back {Path(path).name}.")
        yield update


def last_job_settings(services: StudioServices, owner: str) -> tuple[str, str]:
    """The mode and request JSON (images and seed left out) of ``owner``'s newest txt2img or
    img2img job."""
    for record in services.queue.store.list(owner=owner, limit=50):
        if record.kind in ("txt2img", "img2img"):
            body = {k: v for k, v in record.request.items() if k not in _SKIPPED_FIELDS}
            for unit in body.get("controlnet_units") or []:
                if isinstance(unit, dict):
                    unit.pop("image", None)
            return record.kind, json.dumps(body, indent=2)
    raise ValueError("No txt2img or img2img job of yours yet: generate one in those tabs first.")


def save_preset(
    services: StudioServices,
    name: str,
    mode: str,
    request_json: str,
    **options: Any,
) -> str:
    """Save the preset from request JSON; a message saying where (errors raise, naming the field
    or model). ``options`` as :func:`save_preset_body` takes them."""
    try:
        body = json.loads(request_json or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"Request JSON: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(body, dict):
        raise ValueError("Request JSON: must be an object of request fields.")
    return save_preset_body(services, name, mode, body, **options)


def save_preset_body(
    services: StudioServices,
    name: str,
    mode: str,
    body: dict[str, Any],
    *,
    description: str = "",
    longest_side: float = 512,
    blocked_words: str = "",
    safety_checker: bool = False,
    replace: bool = False,
) -> str:
    """Save a request body (images and seed are left out) as a preset; a message saying where."""
    store = PresetStore.for_services(services)
    preset = preset_from_request(
        (name or "").strip(),
        "img2img" if mode == "img2img" else "txt2img",
        body,
        description=description or "",
        longest_side=int(longest_side or 512),
        blocked_words=[word for word in (blocked_words or "").replace("\n", ",").split(",") if word.strip()],
        safety_checker=bool(safety_checker),
    )
    if not replace and store.path_for(preset.name).exists():
        raise ValueError(f"A preset named {preset.name} exists; tick 'Replace' to overwrite it.")
    path = store.save(preset, services.registry, models_root=services.settings.models_dir)
    return f"Saved {path}."


@dataclass
class SaveAsPreset:
    """The "Save as preset" accordion of the txt2img and img2img tabs."""

    name: Any
    template: Any
    replace: Any
    button: Any
    message: Any


def build_save_as_preset(prefix: str) -> SaveAsPreset:
    """The accordion's widgets; :func:`wire_save_as_preset` connects them once the tab's settings
    widgets exist."""
    with gr.Accordion("Save as preset", open=False, elem_id=f"{prefix}_save_preset"):
        gr.Markdown(
            "Save this tab's current settings as a preset (the Presets tab, the API, the CLI and Discord "
            "run it). The image and the seed are not saved: each run brings its own."
        )
        name = gr.Textbox(
            label="Preset name", placeholder="photo-to-game-character", elem_id=f"{prefix}_preset_name"
        )
        template = gr.Textbox(
            label="Prompt template: {prompt} is where the player's words go",
            placeholder="game character, {prompt}, cel shading  (empty: the prompt above, holding {prompt})",
            elem_id=f"{prefix}_preset_template",
        )
        replace = gr.Checkbox(label="Replace a preset of the same name", value=False)
        button = gr.Button("Save as preset", size="sm", elem_id=f"{prefix}_save_preset_button")
        message = gr.Markdown("", elem_id=f"{prefix}_preset_saved")
    return SaveAsPreset(name, template, replace, button, message)


def save_tab_settings(
    services: StudioServices,
    mode: str,
    values: dict[str, Any],
    name: str,
    template: str = "",
    *,
    replace: bool = False,
) -> str:
    """Save a tab's request values as a preset, its prompt replaced by ``template`` when given."""
    body = dict(values)
    if template and template.strip():
        body["prompt"] = template.strip()
    return save_preset_body(services, name, mode, body, replace=replace)


def wire_save_as_preset(
    services: StudioServices,
    widgets: SaveAsPreset,
    mode: str,
    request_values: Callable[[dict[Any, Any]], dict[str, Any]],
    inputs: set[Any],
) -> None:
    """Save the tab's current settings (``request_values`` of the event's input dict, as the tab's
    Generate builds its request) when the button is pressed."""

    def clicked(data: dict[Any, Any]) -> str:
        try:
            return save_tab_settings(
                services,
                mode,
                request_values(data),
                data[widgets.name] or "",
                data[widgets.template] or "",
                replace=bool(data[widgets.replace]),
            )
        except Exception as exc:
            return f"**Not saved:** {user_message(exc)}"

    widgets.button.click(
        clicked,
        inputs={widgets.name, widgets.template, widgets.replace, *inputs},
        outputs=widgets.message,
        show_progress="hidden",
        concurrency_limit=None,
    )


def build(services: StudioServices) -> Any:
    runner = JobRunner(services)
    names = preset_names(services)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                preset = gr.Dropdown(
                    choices=names,
                    value=names[0] if names else None,
                    label="Preset",
                    elem_id=f"{PREFIX}_preset",
                    allow_custom_value=False,
                )
                refresh = gr.Button(
                    "🔄 Refresh", size="sm", scale=0, min_width=100, elem_id=f"{PREFIX}_refresh"
                )
            summary = gr.Markdown(preset_summary(services, names[0] if names else None))
            photo = gr.File(
                label="Photo (JPEG, PNG, WebP, HEIC)",
                file_types=PHOTO_TYPES,
                type="filepath",
                elem_id=f"{PREFIX}_photo",
            )
            words = gr.Textbox(
                label="A few words",
                lines=2,
                placeholder="a knight with a red cape",
                elem_id=f"{PREFIX}_prompt",
            )
            seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, elem_id=f"{PREFIX}_seed")
            go = gr.Button("Go", variant="primary", size="lg", elem_id=f"{PREFIX}_go")
            interrupt = gr.Button("Interrupt", size="sm", variant="stop", elem_id=f"{PREFIX}_interrupt")
            with gr.Accordion("New preset from a job or request JSON", open=False):
                gr.Markdown(
                    "Generate in txt2img or img2img, then load those settings here (or paste an A1111 "
                    "request JSON). Put `{prompt}` in the prompt where the player's words go. Photos, "
                    "masks and the seed are not saved: each run brings its own."
                )
                load_last = gr.Button("Load my last job's settings", size="sm", elem_id=f"{PREFIX}_load_last")
                new_name = gr.Textbox(
                    label="Name", placeholder="photo-to-game-character", elem_id=f"{PREFIX}_new_name"
                )
                mode = gr.Radio(
                    ["img2img", "txt2img"], value="img2img", label="Mode", elem_id=f"{PREFIX}_mode"
                )
                request_json = gr.Code(
                    label="Request JSON", language="json", elem_id=f"{PREFIX}_request_json"
                )
                description = gr.Textbox(label="Description", elem_id=f"{PREFIX}_description")
                longest_side = gr.Slider(64, 2048, value=512, step=8, label="Photo's longest side (px)")
                blocked = gr.Textbox(label="Blocked words (comma separated)", elem_id=f"{PREFIX}_blocked")
                safety = gr.Checkbox(label="Safety checker (needs models/safety_checker)", value=False)
                replace = gr.Checkbox(label="Replace a preset of the same name", value=False)
                save = gr.Button("Save preset", elem_id=f"{PREFIX}_save")
                saved = gr.Markdown("", elem_id=f"{PREFIX}_saved")
        with gr.Column(scale=1):
            panel = results_panel.build(PREFIX, send_targets=())

    def go_clicked(data: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        session: TabSession = data[panel.state]
        try:
            updates = run_preset(
                runner, session, data[preset], data[photo], data[words] or "", data[seed], job_owner(request)
            )
            first = next(updates)
        except StopIteration:
            return
        except Exception as exc:
            message = user_message(exc)
            yield panel.failure(session, message)
            raise gr.Error(message, print_exception=False) from None
        yield {
            panel.gallery: gr.update(value=[]),
            panel.infotext: "",
            panel.notes: "",
            **panel.show(session, first),
        }
        for update in updates:
            yield panel.show(session, update)
            if update.error:
                raise gr.Error(update.error, print_exception=False)

    def load_last_clicked(request: gr.Request) -> tuple[Any, Any, Any]:
        try:
            kind, body = last_job_settings(services, job_owner(request))
        except ValueError as exc:
            return gr.update(), gr.update(), str(exc)
        return kind, body, "Loaded. Put {prompt} in the prompt, name the preset and save."

    def save_clicked(*values: Any) -> tuple[Any, str]:
        name, kind, body, text, side, words_blocked, checker, overwrite = values
        try:
            message = save_preset(
                services,
                name,
                kind,
                body,
                description=text,
                longest_side=side,
                blocked_words=words_blocked,
                safety_checker=checker,
                replace=overwrite,
            )
        except Exception as exc:
            return gr.update(), f"**Not saved:** {user_message(exc)}"
        return gr.update(choices=preset_names(services), value=name.strip()), message

    go.click(
        go_clicked,
        inputs={preset, photo, words, seed, panel.state},
        outputs=panel.outputs,
        concurrency_id=GPU_CONCURRENCY_ID,
        concurrency_limit=GPU_EVENT_LIMIT,
        show_progress="hidden",
    )
    interrupt.click(
        lambda data: runner.interrupt(data[panel.state]), inputs={panel.state}, show_progress="hidden"
    )
    preset.change(
        lambda name: preset_summary(services, name), inputs=preset, outputs=summary, show_progress="hidden"
    )
    refresh.click(
        lambda: gr.update(choices=preset_names(services)),
        outputs=preset,
        show_progress="hidden",
        concurrency_limit=None,
    )
    load_last.click(load_last_clicked, outputs=[mode, request_json, saved], show_progress="hidden")
    save.click(
        save_clicked,
        inputs=[new_name, mode, request_json, description, longest_side, blocked, safety, replace],
        outputs=[preset, saved],
        show_progress="hidden",
    )
    return panel
