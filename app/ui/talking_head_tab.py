"""Talking head tab: a portrait and a speech recording in, an MP4 of that face speaking out.

Jobs go through the studio queue like image jobs (one GPU job at a time, positions shown);
field ranges come from ``TalkingHeadRequest``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def build(services: StudioServices) -> TalkingHeadTab:
    import gradio as gr

    from app.ui.job_runner import describe_status, job_owner, user_message

    gr.Markdown("Animate a portrait with a speech recording (SadTalker checkpoints in `models/SadTalker`).")
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
                    label="Face enhancer", choices=["none", "gfpgan", "RestoreFormer"], value="none"
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
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="talking_head_generate")
                cancel = gr.Button("Cancel", elem_id="talking_head_cancel")
        with gr.Column():
            status = gr.Markdown("", elem_id="talking_head_status")
            video = gr.Video(label="Result", elem_id="talking_head_video")
    job_state = gr.State(None)

    def run(data: dict[Any, Any], request: gr.Request) -> Iterator[dict[Any, Any]]:
        from pydantic import ValidationError

        from contract.talking_head import TalkingHeadRequest

        if not data[image] or not data[audio]:
            raise gr.Error("Choose a portrait and a speech recording first.")
        try:
            job = TalkingHeadRequest(
                image=data[image],
                audio=data[audio],
                pose_style=int(data[pose_style]),
                expression_scale=float(data[expression]),
                size=int(data[size]),
                preprocess=data[preprocess],
                enhancer=None if data[enhancer] == "none" else data[enhancer],
                still=bool(data[still]),
                batch_size=int(data[batch_size]),
                seed=int(data[seed] if data[seed] is not None else -1),
                ref_eyeblink=data[ref_eyeblink] or None,
                ref_pose=data[ref_pose] or None,
            )
            job_id = services.start_queue().submit(job, owner=job_owner(request))
        except (ValidationError, ValueError) as exc:
            raise gr.Error(user_message(exc)) from None
        yield {job_state: job_id, status: "Queued", video: None}
        queue = services.queue
        while True:
            current = queue.wait(job_id, timeout=0.5)
            line = describe_status(current)
            if current.message and current.state == "running":
                line = f"{current.message}: {line}"
            if current.finished:
                if current.state == "done" and current.images:
                    saved = Path(current.images[0])
                    shown = f"{saved.parent.name}/{saved.name}"
                    yield {status: f"Done: saved to the outputs folder as {shown}", video: str(saved)}
                else:
                    yield {status: f"**{current.state}**: {current.error or 'no video'}"}
                return
            yield {status: line}

    def stop(job_id: str | None) -> str:
        if job_id:
            services.queue.cancel(job_id)
        return "Cancelling..."

    inputs = {
        image,
        audio,
        pose_style,
        expression,
        size,
        preprocess,
        enhancer,
        still,
        batch_size,
        seed,
        ref_eyeblink,
        ref_pose,
    }
    generate.click(
        run,
        inputs=inputs,
        outputs=[job_state, status, video],
        concurrency_id="gpu",
        concurrency_limit=32,
        api_name="talking_head",
    )
    cancel.click(stop, inputs=job_state, outputs=status)
    return TalkingHeadTab(source_image=image)
