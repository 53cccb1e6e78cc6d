"""A ControlNet unit as the A1111 ``sd-webui-controlnet`` extension's API sends it, and the names
(preprocessors, resize and control modes) validating one needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

ResizeModeName = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]
ControlModeName = Literal["Balanced", "My prompt is more important", "ControlNet is more important"]
HiresOptionName = Literal["Both", "Low res only", "High res only"]
HIRES_OPTIONS: tuple[HiresOptionName, ...] = ("Both", "Low res only", "High res only")
RESIZE_MODES: tuple[ResizeModeName, ...] = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES: tuple[ControlModeName, ...] = (
    "Balanced",
    "My prompt is more important",
    "ControlNet is more important",
)
_RESIZE_MODE_ALIASES = {  # the extension's older names
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
    "Just Resize (Latent upscale)": "Just Resize",
}

PREPROCESSOR_NAMES: dict[str, tuple[str, str]] = {
    # key (the extension's UI name): (API module name, full UI label)
    "none": ("none", "none"),
    "invert": ("invert", "invert (from white bg & black line)"),
    "canny": ("canny", "canny"),
    "threshold": ("threshold", "threshold"),
    "scribble_xdog": ("scribble_xdog", "scribble_xdog"),
    "tile_resample": ("tile_resample", "tile_resample"),
    "blur_gaussian": ("blur_gaussian", "blur_gaussian"),
    "lineart_standard": ("lineart_standard", "lineart_standard (from white bg & black line)"),
    "depth_midas": ("depth", "depth_midas"),
    "depth_leres": ("depth_leres", "depth_leres"),
    "depth_leres++": ("depth_leres++", "depth_leres++"),
    "depth_zoe": ("depth_zoe", "depth_zoe"),
    "normal_bae": ("normal_bae", "normal_bae"),
    "normal_midas": ("normal_map", "normal_midas"),
    "openpose": ("openpose", "openpose"),
    "openpose_face": ("openpose_face", "openpose_face"),
    "openpose_hand": ("openpose_hand", "openpose_hand"),
    "openpose_full": ("openpose_full", "openpose_full"),
    "dw_openpose_full": ("dw_openpose_full", "dw_openpose_full"),
    "lineart_realistic": ("lineart", "lineart_realistic"),
    "lineart_coarse": ("lineart_coarse", "lineart_coarse"),
    "lineart_anime": ("lineart_anime", "lineart_anime"),
    "softedge_hed": ("hed", "softedge_hed"),
    "softedge_hedsafe": ("hed_safe", "softedge_hedsafe"),
    "softedge_pidinet": ("pidinet", "softedge_pidinet"),
    "softedge_pidisafe": ("pidinet_safe", "softedge_pidisafe"),
    "scribble_hed": ("scribble_hed", "scribble_hed"),
    "scribble_pidinet": ("pidinet_scribble", "scribble_pidinet"),
    "mlsd": ("mlsd", "mlsd"),
    "seg_ofade20k": ("oneformer_ade20k", "seg_ofade20k"),
    "seg_ofcoco": ("oneformer_coco", "seg_ofcoco"),
    "seg_ufade20k": ("segmentation", "seg_ufade20k"),
}
"""Every preprocessor the studio knows, by the names the extension's UI and API use (the engine's
table in :mod:`pipelines.controlnet.preprocessors` has the same keys; a test keeps them equal)."""

MAX_PROCESSOR_RES = 2048
"""The extension's resolution slider maximum; larger values only allocate huge buffers."""


def resolve_preprocessor_name(name: str) -> str:
    """The table key for a key, API name or label (any case); ValueError naming the choices."""
    wanted = (name or "none").strip().lower()
    for key, (api_name, label) in PREPROCESSOR_NAMES.items():
        if wanted in (key.lower(), api_name.lower(), label.lower()):
            return key
    raise ValueError(
        f"Unknown ControlNet preprocessor (module) '{name}'. Choose one of: {', '.join(PREPROCESSOR_NAMES)}."
    )


class ControlNetUnit(BaseModel):
    """One unit of the extension's API (``alwayson_scripts.controlnet.args[i]``).

    Unknown fields are ignored and the extension's legacy names (``guidance``, ``lowvram``,
    ``input_image``) are accepted. ``image`` is a file path or base64 data (``data:`` URLs too).
    ``processor_res``/``threshold_*`` of ``-1`` mean the preprocessor's defaults.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    enabled: bool = Field(True, description="On unless disabled, as in the extension's API.")
    module: str = Field("none", description="Preprocessor, e.g. 'canny', 'depth_midas', 'none'.")
    model: str = Field("None", description="ControlNet model name from /controlnet/model_list.")
    weight: float = Field(1.0, ge=0.0, le=2.0, description="Control weight.")
    image: str | None = Field(None, description="Control image: a file path or base64 data.")
    resize_mode: ResizeModeName = Field("Crop and Resize", description="How the image is fitted to the size.")
    low_vram: bool = False
    processor_res: int = Field(
        -1, ge=-1, le=MAX_PROCESSOR_RES, description="Preprocessor resolution; -1 = default (512)."
    )
    threshold_a: float = Field(-1, description="First preprocessor parameter; -1 = default.")
    threshold_b: float = Field(-1, description="Second preprocessor parameter; -1 = default.")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of steps before control starts.")
    guidance_end: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of steps after which control stops."
    )
    control_mode: ControlModeName = Field("Balanced", description="Balance between prompt and control.")
    pixel_perfect: bool = Field(False, description="Pick processor_res from the image and target size.")
    hr_option: HiresOptionName = Field(
        "Both", description="With hires fix: control the first pass, the second pass, or both."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in (("guidance", "guidance_end"), ("lowvram", "low_vram"), ("input_image", "image")):
            if old in data and new not in data:
                data[new] = data.pop(old)
        image = data.get("image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}
            data["image"] = image.get("image")
        return data

    @field_validator("module", mode="before")
    @classmethod
    def _known_module(cls, value: Any) -> str:
        return resolve_preprocessor_name(str(value))

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("use 'Just Resize', 'Crop and Resize', 'Resize and Fill' or 0/1/2")
        if isinstance(value, int):
            if value == 3:  # the extension's 'Just Resize (Latent upscale)'
                return "Just Resize"
            if 0 <= value < len(RESIZE_MODES):
                return RESIZE_MODES[value]
            raise ValueError(
                f"{value} is not a resize mode; use 0 (Just Resize), 1 (Crop and Resize), 2 (Resize and Fill)"
            )
        if isinstance(value, str):
            return _RESIZE_MODE_ALIASES.get(value, value)
        return value

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(
                "use 'Balanced', 'My prompt is more important', 'ControlNet is more important' or 0/1/2"
            )
        if isinstance(value, int):
            if 0 <= value < len(CONTROL_MODES):
                return CONTROL_MODES[value]
            raise ValueError(
                f"{value} is not a control mode; use 0 (Balanced), 1 (My prompt), 2 (ControlNet)"
            )
        return value

    @field_validator("hr_option", mode="before")
    @classmethod
    def _hr_option(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(HIRES_OPTIONS):
            return HIRES_OPTIONS[value]
        return value

    def applies_to_pass(self, hires_pass: bool, *, hires_enabled: bool) -> bool:
        """Whether this unit controls the first pass or (``hires_pass``) the hires-fix second pass.

        Without hires fix every enabled unit controls the single pass, whatever ``hr_option`` says.
        """
        if not self.enabled:
            return False
        if not hires_enabled:
            return True
        excluded = "Low res only" if hires_pass else "High res only"
        return self.hr_option != excluded

    @field_validator("guidance_end")
    @classmethod
    def _end_after_start(cls, value: float, info: ValidationInfo) -> float:
        start = info.data.get("guidance_start")
        if start is not None and start > value:
            raise ValueError(f"must not be before guidance_start ({start}); got {value}")
        return value

    @property
    def uses_model(self) -> bool:
        return bool(self.model) and self.model.strip().lower() != "none"
