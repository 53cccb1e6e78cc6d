"""ControlNet units inside txt2img/img2img: one accordion with a sub-tab per unit, like the A1111
extension. Each unit has its control image, preprocessor and model, weight, guidance range,
control and resize modes, and a preview of the preprocessed control image.

The units go into a generation request as ``controlnet_units`` (the extension's API unit fields,
validated by :class:`contract.controlnet.ControlNetUnit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.ui.checked_images import CheckedImage, readable
from app.ui.generation_controls import field_default, field_range
from app.ui.images import encode_png
from app.ui.job_runner import GPU_CONCURRENCY_ID, GPU_EVENT_LIMIT, user_message

if TYPE_CHECKING:
    from app.services import StudioServices

UNIT_COUNT = 3
NO_MODEL = "None"
REQUEST_FIELD = "controlnet_units"


@dataclass
class UnitControls:
    index: int
    enabled: Any
    image: Any
    module: Any
    model: Any
    weight: Any
    guidance_start: Any
    guidance_end: Any
    control_mode: Any
    resize_mode: Any
    hr_option: Any
    pixel_perfect: Any
    processor_res: Any
    threshold_a: Any
    threshold_b: Any
    preview: Any
    run_preview: Any

    @property
    def inputs(self) -> set[Any]:
        return {
            self.enabled,
            self.image,
            self.module,
            self.model,
            self.weight,
            self.guidance_start,
            self.guidance_end,
            self.control_mode,
            self.resize_mode,
            self.hr_option,
            self.pixel_perfect,
            self.processor_res,
            self.threshold_a,
            self.threshold_b,
        }

    def unit_values(self, data: dict[Any, Any]) -> dict[str, Any] | None:
        """The API unit for this unit's controls, or None when it is off."""
        if not data.get(self.enabled):
            return None
        image = readable(data.get(self.image))
        if image is None:
            raise ValueError(
                f"ControlNet Unit {self.index}: it is enabled but has no control image; upload one."
            )
        return {
            "enabled": True,
            "module": data[self.module],
            "model": data[self.model] or NO_MODEL,
            "weight": data[self.weight],
            "image": encode_png(image),
            "resize_mode": data[self.resize_mode],
            "pixel_perfect": bool(data[self.pixel_perfect]),
            "processor_res": int(data[self.processor_res]),
            "threshold_a": float(data[self.threshold_a]),
            "threshold_b": float(data[self.threshold_b]),
            "guidance_start": data[self.guidance_start],
            "guidance_end": data[self.guidance_end],
            "control_mode": data[self.control_mode],
            "hr_option": data[self.hr_option],
        }


@dataclass
class ControlNetBlock:
    units: list[UnitControls] = field(default_factory=list)

    @property
    def inputs(self) -> set[Any]:
        return {component for unit in self.units for component in unit.inputs}

    def request_values(self, data: dict[Any, Any], request_model: type | None = None) -> dict[str, Any]:
        """``{"controlnet_units": [...]}`` for the enabled units (empty when none is on)."""
        from contract.controlnet import ControlNetUnit

        units = [values for unit in self.units if (values := unit.unit_values(data)) is not None]
        if not units:
            return {}
        validated = [ControlNetUnit(**values).model_dump() for values in units]
        if request_model is not None and REQUEST_FIELD not in request_model.model_fields:
            raise ValueError(
                "ControlNet units cannot be used with this kind of job yet; untick 'Enable' in the "
                "ControlNet units to generate without them."
            )
        return {REQUEST_FIELD: validated}


def model_choices(services: StudioServices) -> list[str]:
    from pipelines.controlnet.model_files import model_catalogue

    return [NO_MODEL, *model_catalogue(services.registry.paths.folder("controlnet"))["model_list"]]


def _slider_update(spec: Any, fallback_label: str) -> Any:
    """A preprocessor parameter slider: shown with the preprocessor's label and range, or hidden."""
    if spec is None:
        return gr.update(visible=False, label=fallback_label, value=-1)
    return gr.update(
        visible=True,
        label=spec.label,
        minimum=spec.minimum,
        maximum=spec.maximum,
        step=spec.step,
        value=spec.value,
    )


def build(
    services: StudioServices, prefix: str, *, width: Any = None, height: Any = None, units: int = UNIT_COUNT
) -> ControlNetBlock:
    """Render the ControlNet accordion; ``width``/``height`` (the generation size sliders) feed
    "Pixel Perfect" in the preview."""
    from contract.controlnet import ControlNetUnit
    from pipelines.controlnet.preprocessors import PREPROCESSORS

    block = ControlNetBlock()
    with gr.Accordion("ControlNet", open=False, elem_id=f"{prefix}_controlnet"):
        with gr.Tabs():
            for index in range(units):
                with gr.Tab(f"ControlNet Unit {index}", id=f"{prefix}_cn_unit_{index}"):
                    block.units.append(_build_unit(services, prefix, index, PREPROCESSORS, ControlNetUnit))
        with gr.Row():
            refresh = gr.Button("🔄 Refresh models", size="sm", elem_id=f"{prefix}_controlnet_refresh")

    def refresh_models() -> list[Any]:
        choices = model_choices(services)
        return [gr.update(choices=choices) for _ in block.units]

    refresh.click(
        refresh_models,
        outputs=[unit.model for unit in block.units],
        show_progress="hidden",
        concurrency_limit=None,
    )
    for unit in block.units:
        _wire_unit(services, unit, width, height, PREPROCESSORS)
    return block


def _build_unit(
    services: StudioServices, prefix: str, index: int, preprocessors: Any, unit_model: Any
) -> UnitControls:
    from contract.controlnet import CONTROL_MODES, HIRES_OPTIONS, RESIZE_MODES

    unit_id = f"{prefix}_cn{index}"
    with gr.Row():
        image = CheckedImage(
            field=f"ControlNet Unit {index} control image",
            label="Control image",
            type="pil",
            image_mode="RGB",
            sources=["upload", "clipboard"],
            elem_id=f"{unit_id}_image",
            height=260,
        )
        preview = gr.Image(
            label="Preprocessor preview",
            type="pil",
            interactive=False,
            elem_id=f"{unit_id}_preview",
            height=260,
            format="png",
        )
    with gr.Row():
        enabled = gr.Checkbox(label="Enable", value=False, elem_id=f"{unit_id}_enabled")
        pixel_perfect = gr.Checkbox(label="Pixel Perfect", value=False)
        run_preview = gr.Button("💥 Preview preprocessor", size="sm", elem_id=f"{unit_id}_run_preview")
    with gr.Row():
        module = gr.Dropdown(
            choices=list(preprocessors), value="none", label="Preprocessor", elem_id=f"{unit_id}_module"
        )
        model = gr.Dropdown(
            choices=model_choices(services), value=NO_MODEL, label="Model", elem_id=f"{unit_id}_model"
        )
    with gr.Row():
        weight = gr.Slider(
            label="Control Weight",
            step=0.05,
            value=field_default(unit_model, "weight"),
            **field_range(unit_model, "weight"),
        )
        guidance_start = gr.Slider(
            label="Starting Control Step",
            step=0.01,
            value=field_default(unit_model, "guidance_start"),
            **field_range(unit_model, "guidance_start"),
        )
        guidance_end = gr.Slider(
            label="Ending Control Step",
            step=0.01,
            value=field_default(unit_model, "guidance_end"),
            **field_range(unit_model, "guidance_end"),
        )
    none = preprocessors["none"]
    resolution = none.resolution
    with gr.Row():
        processor_res = gr.Slider(
            label=resolution.label,
            minimum=resolution.minimum,
            maximum=resolution.maximum,
            step=resolution.step,
            value=resolution.value,
        )
        threshold_a = gr.Slider(label="Threshold A", minimum=-1, maximum=255, value=-1, visible=False)
        threshold_b = gr.Slider(label="Threshold B", minimum=-1, maximum=255, value=-1, visible=False)
    control_mode = gr.Radio(choices=list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode")
    resize_mode = gr.Radio(
        choices=list(RESIZE_MODES), value=field_default(unit_model, "resize_mode"), label="Resize Mode"
    )
    hr_option = gr.Radio(
        choices=list(HIRES_OPTIONS),
        value=field_default(unit_model, "hr_option"),
        label="Hires fix: control",
        info="Which pass of hires fix this unit controls (ignored without hires fix).",
    )
    return UnitControls(
        index=index,
        enabled=enabled,
        image=image,
        module=module,
        model=model,
        weight=weight,
        guidance_start=guidance_start,
        guidance_end=guidance_end,
        control_mode=control_mode,
        resize_mode=resize_mode,
        hr_option=hr_option,
        pixel_perfect=pixel_perfect,
        processor_res=processor_res,
        threshold_a=threshold_a,
        threshold_b=threshold_b,
        preview=preview,
        run_preview=run_preview,
    )


def _wire_unit(
    services: StudioServices, unit: UnitControls, width: Any, height: Any, preprocessors: Any
) -> None:
    def module_changed(name: str) -> tuple[Any, Any, Any]:
        spec = preprocessors.get(name)
        if spec is None:
            return gr.update(), gr.update(), gr.update()
        return (
            _slider_update(spec.resolution, "Resolution"),
            _slider_update(spec.slider_1, "Threshold A"),
            _slider_update(spec.slider_2, "Threshold B"),
        )

    def preview(data: dict[Any, Any]) -> Any:
        from pipelines.controlnet.preprocessors import (
            default_annotator_dirs,
            pixel_perfect_resolution,
            run_preprocessor,
        )

        try:
            image = readable(data[unit.image])
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        if image is None:
            raise gr.Error(
                f"ControlNet Unit {unit.index}: upload a control image first.", print_exception=False
            )
        resolution = int(data[unit.processor_res])
        if data[unit.pixel_perfect] and width is not None and height is not None:
            resolution = pixel_perfect_resolution(
                image.height,
                image.width,
                width=int(data[width]),
                height=int(data[height]),
                resize_mode=data[unit.resize_mode],
            )
        try:
            return run_preprocessor(
                data[unit.module],
                image,
                resolution=resolution,
                threshold_a=float(data[unit.threshold_a]),
                threshold_b=float(data[unit.threshold_b]),
                annotator_dir=default_annotator_dirs(services.settings.models_dir),
                annotators=services.engine.annotator_cache,
            )
        except Exception as exc:
            raise gr.Error(user_message(exc), print_exception=False) from None

    unit.module.change(
        module_changed,
        inputs=unit.module,
        outputs=[unit.processor_res, unit.threshold_a, unit.threshold_b],
        show_progress="hidden",
        queue=False,
    )
    preview_inputs = {
        unit.image,
        unit.module,
        unit.processor_res,
        unit.threshold_a,
        unit.threshold_b,
        unit.pixel_perfect,
        unit.resize_mode,
    }
    if width is not None and height is not None:
        preview_inputs |= {width, height}
    unit.run_preview.click(
        preview,
        inputs=preview_inputs,
        outputs=unit.preview,
        concurrency_id=GPU_CONCURRENCY_ID,
        concurrency_limit=GPU_EVENT_LIMIT,
        show_progress="minimal",
    )
