"""Talking head tab: a portrait and a speech recording in, an MP4 of that face speaking out.

Jobs go through the studio queue like image jobs (one GPU job at a time, positions shown);
field ranges come from ``TalkingHeadRequest``. The form's values become a request in
:func:`request_from_form` (plain Python, tested without a browser).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr  # at module level: handlers' ``gr.Request`` annotations must resolve

from installer.launch_command import launch_command

if TYPE_CHECKING:
    from app.services import StudioServices


@dataclass
class TalkingHeadTab:
    source_image: Any  # "send to talking head" writes a file path here


def _bounds(field: str) -> dict[str, Any]:
    from contract.talking_head import TalkingHeadRequest

    info = TalkingHeadRequest.model_fields[field]
    bounds: dict[str, Any] = {"value": info.default}
    for item in info.metadata:
        if hasattr(item, "ge"):
            bounds["minimum"] = item.ge
        if hasattr(item, "le"):
            bounds["maximum"] = item.le
    return bounds


NO_ENHANCER = "none"
_ANGLE_SEPARATORS = re.compile(r"[,;\s]+")


def background_enhancer_choices(models_dir: Path) -> list[str]:
    """``none`` then the model upscalers the studio lists (models/ESRGAN and A1111's other folders)."""
    from pipelines.postprocess.upscalers import UPSCALER_FOLDERS, list_upscalers

    names = [info.name for info in list_upscalers(models_dir) if info.kind in UPSCALER_FOLDERS]
    return [NO_ENHANCER, *names]


def parse_angle_path(text: str | None, field: str) -> list[float] | None:
    """``"0, 15, -10"`` -> ``[0.0, 15.0, -10.0]`` (commas, semicolons or spaces); blank -> ``None``."""
    if text is None or not str(text).strip():
        return None
    angles = []
    for item in _ANGLE_SEPARATORS.split(str(text).strip()):
        try:
            angles.append(float(item))
        except ValueError:
            raise ValueError(
                f"{field}: '{item}' is not an angle. Type degrees separated by commas, e.g. 0, 15, -10."
            ) from None
    return angles


def request_from_form(values: dict[str, Any]) -> Any:
    """The ``TalkingHeadRequest`` for the tab's values (keyed by field name, as the components
    give them: sliders as floats, "none" for no enhancer, angle paths as text)."""
    from contract.talking_head import TalkingHeadRequest

    def chosen(name: str) -> str | None:
        value = values.get(name)
        return None if value in (None, "", NO_ENHANCER) else str(value)

    seed = values.get("seed")
    return TalkingHeadRequest(
        image=values["image"],
        audio=values["audio"],
        pose_style=int(values["pose_style"]),
        expression_scale=float(values["expression_scale"]),
        size=int(values["size"]),
        preprocess=values["preprocess"],
        enhancer=chosen("enhancer"),
        background_enhancer=chosen("background_enhancer"),
        still=bool(values["still"]),
        batch_size=int(values["batch_size"]),
        seed=int(seed if seed is not None else -1),
        ref_eyeblink=values.get("ref_eyeblink") or None,
        ref_pose=values.get("ref_pose") or None,
        **{
            field: parse_angle_path(values.get(field), field)
            for field in ("input_yaw", "input_pitch", "input_roll")
        },
    )


def model_files_checklist(models_dir: Path) -> str:
    """Markdown: every file the tab needs, present or missing (all of them, not just the first),
    with the command that fetches each missing one, so an artist checks before uploading anything."""
    from sadtalker.checkpoints import (
        MAPPING_CROP_FILE,
        MAPPING_FULL_FILE,
        SADTALKER_FOLDER,
        checkpoint_file_name,
        find_sadtalker_files,
    )

    files = find_sadtalker_files(models_dir)
    needed = [
        (checkpoint_file_name(256), files.checkpoint_256, "the face renderer (256 px)"),
        (MAPPING_CROP_FILE, files.mapping_crop, "head motion for crop / extcrop / resize"),
        (MAPPING_FULL_FILE, files.mapping_full, "head motion for full / extfull"),
    ]
    optional = [(checkpoint_file_name(512), files.checkpoint_512, "the 512 px face renderer")]
    missing = [name for name, found, _ in needed if found is None]
    lines = [
        "**Model files**: all present, ready to go."
        if not missing
        else f"**Model files**: {len(missing)} of {len(needed)} required file(s) missing from "
        f"`models/{SADTALKER_FOLDER}/`; a video cannot be made until they are there."
    ]
    for name, found, purpose in [*needed, *optional]:
        required = (name, found, purpose) in needed
        mark = "✅ present" if found else ("❌ missing" if required else "optional, not present")
        line = f"- `{name}` ({purpose}): {mark}"
        if not found:
            fetch = launch_command("download vinthony/SadTalker --kind SadTalker --file", name)
            line += f"  \n  `{fetch}`"
        lines.append(line)
    return "\n".join(lines)


def build(services: StudioServices) -> TalkingHeadTab:
    from app.ui.job_runner import JobRunner, TabSession, job_owner, user_message
    from pipelines.errors import StudioError

    gr.Markdown("Animate a portrait with a speech recording (SadTalker checkpoints in `models/SadTalker`).")
    with gr.Row(equal_height=True):
        checklist = gr.Markdown(
            model_files_checklist(services.settings.models_dir), elem_id="talking_head_files"
        )
        recheck = gr.Button("Check files again", size="sm", scale=0, min_width=150)
    recheck.click(
        lambda: model_files_checklist(services.settings.models_dir),
        outputs=checklist,
        show_progress="hidden",
        concurrency_limit=None,
    )
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Portrait", type="filepath", elem_id="talking_head_image")
            audio = gr.Audio(
                label="Speech",
                type="filepath",
                sources=["upload", "microphone"],
                elem_id="talking_head_audio",
            )
            with gr.Row():
                pose_style = gr.Slider(
                    label="Pose style", step=1, elem_id="talking_head_pose_style", **_bounds("pose_style")
                )
                expression = gr.Slider(
                    label="Expression scale",
                    step=0.05,
                    elem_id="talking_head_expression_scale",
                    **_bounds("expression_scale"),
                )
            with gr.Row():
                size = gr.Radio(label="Face resolution", choices=[256, 512], value=256)
                preprocess = gr.Dropdown(
                    label="Preprocess", choices=["crop", "extcrop", "resize", "full", "extfull"], value="crop"
                )
                enhancer = gr.Dropdown(
                    label="Face enhancer",
                    choices=[NO_ENHANCER, "gfpgan", "RestoreFormer"],
                    value=NO_ENHANCER,
                    elem_id="talking_head_enhancer",
                )
            with gr.Row():
                background_enhancer = gr.Dropdown(
                    label="Background enhancer (upscaler from models/ESRGAN)",
                    choices=background_enhancer_choices(services.settings.models_dir),
                    value=NO_ENHANCER,
                    info="Runs over the whole frame; the face enhancer's face is pasted over it.",
                    elem_id="talking_head_background_enhancer",
                    scale=4,
                )
                refresh_upscalers = gr.Button(
                    "Refresh", size="sm", elem_id="talking_head_refresh_upscalers", scale=1
                )
            with gr.Row():
                still = gr.Checkbox(
                    label="Still (little head motion)", value=False, elem_id="talking_head_still"
                )
                batch_size = gr.Slider(
                    label="Frames per batch",
                    step=1,
                    elem_id="talking_head_batch_size",
                    **_bounds("batch_size"),
                )
                seed = gr.Number(label="Seed", value=-1, precision=0, elem_id="talking_head_seed")
            with gr.Accordion("Reference videos", open=False):
                ref_eyeblink = gr.Video(label="Copy eye blinks from")
                ref_pose = gr.Video(label="Copy head motion from")
            with gr.Accordion("Head angles (free-view)", open=False):
                gr.Markdown(
                    "Degrees the head turns through over the clip, e.g. `0, 15, -10` "
                    "(one value holds that angle). Leave blank for the learned motion."
                )
                with gr.Row():
                    input_yaw = gr.Textbox(
                        label="Yaw path", placeholder="0, 15", elem_id="talking_head_input_yaw"
                    )
                    input_pitch = gr.Textbox(
                        label="Pitch path", placeholder="0, -5", elem_id="talking_head_input_pitch"
                    )
                    input_roll = gr.Textbox(
                        label="Roll path", placeholder="0", elem_id="talking_head_input_roll"
                    )
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="talking_head_generate")
                cancel = gr.Button("Cancel", elem_id="talking_head_cancel")
        with gr.Column():
            status = gr.Markdown("", elem_id="talking_head_status")
            video = gr.Video(label="Result", elem_id="talking_head_video")
    job_state = gr.State(None)

    runner = JobRunner(services)

    def run(data: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        """The same queue runner as the image tabs: position, stage progress, then the video."""
        from pydantic import ValidationError

        if not data[image] or not data[audio]:
            raise gr.Error("Choose a portrait and a speech recording first.")
        session = TabSession()
        try:
            job = request_from_form({name: data[component] for name, component in form.items()})
            [job_id] = runner.submit(session, [job], job_owner(request))
        except (ValidationError, ValueError, StudioError) as exc:
            raise gr.Error(user_message(exc)) from None
        yield {job_state: job_id, status: "Queued", video: None}
        for update in runner.follow(session):
            if not update.finished:
                yield {status: update.text}
                continue
            saved = next((Path(item.path) for item in session.images if item.path.endswith(".mp4")), None)
            if update.state == "done" and saved is not None:
                shown = f"{saved.parent.name}/{saved.name}"
                yield {status: f"Done: saved to the outputs folder as {shown}", video: str(saved)}
            else:
                yield {status: f"**{update.state}**: {update.error or update.text}"}

    def stop(job_id: str | None) -> str:
        if job_id:
            services.queue.cancel(job_id)
        return "Cancelling..."

    form = {
        "image": image,
        "audio": audio,
        "pose_style": pose_style,
        "expression_scale": expression,
        "size": size,
        "preprocess": preprocess,
        "enhancer": enhancer,
        "background_enhancer": background_enhancer,
        "still": still,
        "batch_size": batch_size,
        "seed": seed,
        "ref_eyeblink": ref_eyeblink,
        "ref_pose": ref_pose,
        "input_yaw": input_yaw,
        "input_pitch": input_pitch,
        "input_roll": input_roll,
    }
    refresh_upscalers.click(
        lambda: gr.update(choices=background_enhancer_choices(services.settings.models_dir)),
        outputs=background_enhancer,
    )
    generate.click(
        run,
        inputs=set(form.values()),
        outputs=[job_state, status, video],
        concurrency_id="gpu",
        concurrency_limit=32,
        api_name="talking_head",
    )
    cancel.click(stop, inputs=job_state, outputs=status)
    return TalkingHeadTab(source_image=image)
