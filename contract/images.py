"""Typed job requests shared by the UI, the REST API, the CLI and the cluster.

Field names and defaults follow AUTOMATIC1111's ``/sdapi/v1/txt2img`` so that clients written
for A1111 work unchanged. Bounds live on the fields (UI sliders read them from here).
Unknown fields are ignored, as A1111's API does, so newer clients keep working.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from contract.budget import check_pixels, checked_image_size, model_upscale_side_factor
from contract.controlnet import ControlNetUnit

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1
MAX_CACHE_INTERVAL = 10
MAX_TOKEN_MERGING_RATIO = 0.9
SPEED_FIELDS = ("cache_interval", "token_merging_ratio", "fast_decode")


def random_seed() -> int:
    """A fresh seed in A1111's range, for ``seed=-1``."""
    return secrets.randbelow(MAX_SEED)


def _not_a_bool(value: Any) -> Any:
    """JSON ``true`` is no number of layers: pydantic would read it as 1."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, not true/false")
    return value


SettingName = Annotated[str | None, Field(max_length=1024)]


@with_config(ConfigDict(extra="allow"))
class OverrideSettings(TypedDict, total=False):
    """A1111's per-job ``override_settings``: the keys SD Studio reads are checked (type and range,
    so a wrong value is a 422 naming ``override_settings.<key>``, never a failed job); any other key
    is passed through untouched, as A1111 ignores the options it does not know."""

    sd_model_checkpoint: SettingName
    sd_vae: SettingName
    face_restoration_model: SettingName
    CLIP_stop_at_last_layers: Annotated[
        Annotated[int, Field(ge=1, le=12)] | None, BeforeValidator(_not_a_bool)
    ]
    eta_noise_seed_delta: Annotated[
        Annotated[int, Field(ge=0, le=MAX_SEED)] | None, BeforeValidator(_not_a_bool)
    ]
    cache_interval: Annotated[
        Annotated[int, Field(ge=1, le=MAX_CACHE_INTERVAL)] | None, BeforeValidator(_not_a_bool)
    ]
    token_merging_ratio: Annotated[float, Field(ge=0.0, le=MAX_TOKEN_MERGING_RATIO)] | None
    fast_decode: bool | None


class GenerationRequest(BaseModel):
    """Fields common to every image-generation mode."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    prompt: str = Field("", description="What to draw. A1111 emphasis syntax: (word:1.2), [word], BREAK.")
    negative_prompt: str = Field("", description="What to avoid.")
    styles: list[str] = Field(default_factory=list, description="Saved prompt styles to apply.")
    seed: int = Field(RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED, description="-1 picks a random seed.")
    subseed: int = Field(RANDOM_SEED, ge=RANDOM_SEED, le=MAX_SEED, description="Variation seed; -1 = random.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="How far toward the variation seed.")
    seed_resize_from_h: int = Field(-1, ge=-1, le=8192)
    seed_resize_from_w: int = Field(-1, ge=-1, le=8192)
    sampler_name: str | None = Field(None, description="Sampler, A1111 name (e.g. 'Euler a', 'DPM++ 2M').")
    sampler_index: str = Field("Euler", description="Legacy A1111 field, used when sampler_name is empty.")
    scheduler: str = Field("Automatic", description="Schedule type: Automatic, Uniform, Karras, ...")
    batch_size: int = Field(1, ge=1, le=64, description="Images made together in one pass.")
    n_iter: int = Field(1, ge=1, le=1000, description="Batch count: passes run one after another.")
    steps: int = Field(50, ge=1, le=150, description="Sampling steps.")
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0, description="Classifier-free guidance scale.")
    width: int = Field(512, ge=64, le=8192, description="Image width in pixels (multiple of 8).")
    height: int = Field(512, ge=64, le=8192, description="Image height in pixels (multiple of 8).")
    clip_skip: int = Field(1, ge=1, le=12, description="Stop CLIP this many layers from the end (1 = last).")
    eta: float | None = Field(
        None, ge=0.0, le=1.0, description="Noise multiplier for ancestral/DDIM samplers."
    )
    restore_faces: bool | None = Field(
        None,
        description="Restore faces in each image (override_settings.face_restoration_model: GFPGAN by "
        "default, or RestoreFormer).",
    )
    tiling: bool | None = Field(None, description="Seamless tiling: the image wraps around at its edges.")
    cache_interval: int | None = Field(
        None,
        ge=1,
        le=MAX_CACHE_INTERVAL,
        description="Step caching (DeepCache): run the full UNet every N steps and reuse its deep "
        "features in between; 1 = off, none = the studio's setting.",
    )
    token_merging_ratio: float | None = Field(
        None,
        ge=0.0,
        le=MAX_TOKEN_MERGING_RATIO,
        description="Token merging (ToMe): share of the highest-resolution self-attention tokens merged; "
        "0 = off, none = the studio's setting.",
    )
    fast_decode: bool | None = Field(
        None,
        description="Decode the final image with TAESD (models/VAE-approx): fast, lower quality (drafts); "
        "none = the studio's setting.",
    )
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    override_settings: OverrideSettings = Field(
        default_factory=lambda: OverrideSettings(),
        description="Per-job settings, A1111 style, e.g. {'sd_model_checkpoint': 'name'}.",
    )
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = True
    controlnet_units: list[ControlNetUnit] = Field(
        default_factory=list,
        description="ControlNet units (also read from alwayson_scripts.ControlNet.args).",
    )
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="A1111 extension arguments.")

    @model_validator(mode="before")
    @classmethod
    def _controlnet_from_alwayson_scripts(cls, data: Any) -> Any:
        """The ControlNet extension's API: ``alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}``."""
        if not isinstance(data, dict):
            return data
        scripts = data.get("alwayson_scripts") or {}
        if not isinstance(scripts, dict):
            return data
        for name, value in scripts.items():
            if (
                str(name).lower() == "controlnet"
                and isinstance(value, dict)
                and not data.get("controlnet_units")
            ):
                units = value.get("args") or []
                return {**data, "controlnet_units": [u for u in units if isinstance(u, dict)]}
        return data

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            raise ValueError(f"must be a multiple of 8 (try {lower} or {upper})")
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_legacy_sampler_names(cls, data: Any) -> Any:
        """Accept A1111's pre-1.9 names such as ``"DPM++ 2M Karras"`` (sampler + schedule type)."""
        if not isinstance(data, dict):
            return data
        from contract.samplers import UnknownSamplerError, split_legacy_sampler_name

        data = dict(data)
        for key in ("sampler_name", "sampler_index"):
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                if key == "sampler_name" and value == "":
                    data[key] = None
                continue
            try:
                sampler, schedule = split_legacy_sampler_name(value)
            except UnknownSamplerError:
                continue  # reported by the field validator, naming the field
            data[key] = sampler
            if schedule and data.get("scheduler") in (None, "", "Automatic"):
                data["scheduler"] = schedule
        return data

    @field_validator("sampler_name", "sampler_index")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from contract.samplers import resolve_sampler_name

        return resolve_sampler_name(value)

    @model_validator(mode="after")
    def _known_schedule_type(self) -> GenerationRequest:
        from contract.samplers import resolve_schedule_type, schedule_types_for

        allowed = schedule_types_for(self.effective_sampler)
        try:
            schedule = resolve_schedule_type(self.scheduler)
        except ValueError:
            schedule = self.scheduler
        if schedule not in allowed:
            raise ValueError(
                f"scheduler: '{self.scheduler}' is not available for sampler '{self.effective_sampler}'; "
                f"choose one of {', '.join(allowed)}"
            )
        if schedule != self.scheduler:
            object.__setattr__(self, "scheduler", schedule)
        clip_override = self.override_settings.get("CLIP_stop_at_last_layers")
        if clip_override is not None and self.clip_skip == 1:
            object.__setattr__(self, "clip_skip", int(clip_override))
        return self

    @model_validator(mode="after")
    def _within_memory_budget(self) -> GenerationRequest:
        """Output size and every image given, against the memory budget (``contract/budget.py``)."""
        check_pixels("width", "the image", self.width, self.height)
        for index, unit in enumerate(self.controlnet_units):
            if unit.enabled and unit.image:
                checked_image_size(f"controlnet_units.{index}.image", unit.image)
        return self

    @property
    def effective_sampler(self) -> str:
        """A1111 reads ``sampler_name`` first and falls back to the legacy ``sampler_index``."""
        return self.sampler_name or self.sampler_index or "Euler"

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint this job asks for (A1111's ``override_settings.sd_model_checkpoint``)."""
        name = self.override_settings.get("sd_model_checkpoint")
        return str(name) if name else None

    @property
    def vae(self) -> str | None:
        name = self.override_settings.get("sd_vae")
        return str(name) if name else None

    @property
    def face_restoration_model(self) -> str:
        """A1111's ``face_restoration_model`` setting, per job (GFPGAN when not given)."""
        name = self.override_settings.get("face_restoration_model")
        return str(name) if name else "GFPGAN"

    def speed_settings(self) -> dict[str, Any]:
        """The speed options this job sets: a request field, else ``override_settings``; options it
        leaves out take the studio's defaults."""
        chosen: dict[str, Any] = {}
        for name in SPEED_FIELDS:
            value = getattr(self, name)
            if value is None:
                value = self.override_settings.get(name)
            if value is not None:
                chosen[name] = value
        return chosen

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


class Txt2ImgRequest(GenerationRequest):
    """A1111 ``/sdapi/v1/txt2img``."""

    mode: Literal["txt2img"] = "txt2img"
    enable_hr: bool = Field(False, description="Hires fix: upscale and run a second pass.")
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=150)
    hr_resize_x: int = Field(0, ge=0, le=8192)
    hr_resize_y: int = Field(0, ge=0, le=8192)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    firstphase_width: int = 0
    firstphase_height: int = 0

    @property
    def hires_size(self) -> tuple[int, int]:
        """The second pass's size, as A1111 computes it: ``hr_resize_x/y`` when given (one of them
        alone keeps the aspect ratio), else the first pass's size times ``hr_scale``."""
        if not self.hr_resize_x and not self.hr_resize_y:
            return int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if not self.hr_resize_y:
            return self.hr_resize_x, self.hr_resize_x * self.height // self.width
        if not self.hr_resize_x:
            return self.hr_resize_y * self.width // self.height, self.hr_resize_y
        return self.hr_resize_x, self.hr_resize_y

    @model_validator(mode="after")
    def _hires_within_memory_budget(self) -> Txt2ImgRequest:
        if self.enable_hr:
            field = "hr_resize_x" if self.hr_resize_x or self.hr_resize_y else "hr_scale"
            check_pixels(field, "the hires fix's second pass", *self.hires_size)
        return self


_JOB_UNION_TAGS = {"txt2img", "img2img", "extras", "talking_head"}
"""Pydantic puts the discriminator's value first in the location of an error in a job union."""


def format_validation_error(error: ValidationError) -> str:
    """One readable line per problem, each naming the field: ``width: must be a multiple of 8``."""
    lines = []
    for item in error.errors():
        parts = list(item.get("loc", ()))
        if len(parts) > 0 and parts[0] in _JOB_UNION_TAGS:  # the tag of the job-kind union, not a field
            parts = parts[1:]
        location = ".".join(str(part) for part in parts)
        message = str(item.get("msg", "invalid value"))
        message = message.removeprefix("Value error, ")
        if not location or message.startswith(f"{location}: "):
            lines.append(message)  # model-level checks already name their field
        else:
            lines.append(f"{location}: {message}")
    return "\n".join(lines)


class Img2ImgRequest(GenerationRequest):
    """A1111 ``/sdapi/v1/img2img``: img2img, inpainting (with ``mask``) and outpainting.

    Images are file paths (CLI) or base64 strings with or without a ``data:`` prefix (API).
    """

    mode: Literal["img2img"] = "img2img"
    init_images: list[str] = Field(..., min_length=1, description="Source image(s): paths or base64.")
    resize_mode: int = Field(
        0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent"
    )
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, description="0 returns the input; 1 ignores it.")
    image_cfg_scale: float | None = Field(
        None, ge=0.0, le=30.0, description="Image CFG (instruct-pix2pix models)."
    )
    mask: str | None = Field(None, description="Inpainting mask (white = change): path or base64.")
    mask_blur: int | None = Field(None, ge=0, le=64, description="Sets mask_blur_x and mask_blur_y.")
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(
        0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing"
    )
    inpaint_full_res: bool = Field(True, description="Inpaint only the masked area at full resolution.")
    inpaint_full_res_padding: int = Field(0, ge=0, le=256, description="Padding around the masked area, px.")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1 = change the black part of the mask.")
    outpaint_left: int = Field(0, ge=0, le=2048, description="Outpainting: pixels to add on the left.")
    outpaint_right: int = Field(0, ge=0, le=2048)
    outpaint_up: int = Field(0, ge=0, le=2048)
    outpaint_down: int = Field(0, ge=0, le=2048)
    upscaler: str | None = Field(
        None,
        max_length=256,
        description="Upscale each finished image with this upscaler (as Extras does; not in A1111's "
        "img2img): a name from /sdapi/v1/upscalers. Presets use it.",
    )
    upscale_by: float = Field(1.0, ge=1.0, le=8.0, description="Factor for `upscaler` (1 = off).")
    include_init_images: bool = False

    @field_validator("inpainting_mask_invert", mode="before")
    @classmethod
    def _bool_as_int(cls, value: Any) -> Any:
        return int(value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _apply_mask_blur(self) -> Img2ImgRequest:
        if self.mask_blur is not None:
            object.__setattr__(self, "mask_blur_x", self.mask_blur)
            object.__setattr__(self, "mask_blur_y", self.mask_blur)
        return self

    @model_validator(mode="after")
    def _images_within_memory_budget(self) -> Img2ImgRequest:
        """Init images, mask and the outpainted canvas against the memory budget, from the images'
        headers (nothing is decoded)."""
        grow_w = self.outpaint_left + self.outpaint_right
        grow_h = self.outpaint_up + self.outpaint_down
        if self.outpainting:
            check_pixels("outpaint_left", "the outpainted canvas", self.width + grow_w, self.height + grow_h)
        for index, image in enumerate(self.init_images):
            size = checked_image_size(f"init_images.{index}", image)
            if size is not None and self.outpainting:
                check_pixels("outpaint_left", "the outpainted canvas", size[0] + grow_w, size[1] + grow_h)
        if self.mask:
            checked_image_size("mask", self.mask)
        if self.upscaler and self.upscale_by > 1:
            grown = (self.width * self.upscale_by, self.height * self.upscale_by)
            check_pixels("upscale_by", "the upscaled image", *grown)
        return self

    @property
    def outpainting(self) -> bool:
        return any((self.outpaint_left, self.outpaint_right, self.outpaint_up, self.outpaint_down))


class ExtrasRequest(BaseModel):
    """A1111 ``/sdapi/v1/extra-single-image``: upscale and/or restore faces."""

    model_config = ConfigDict(extra="ignore")

    mode: Literal["extras"] = "extras"
    image: str = Field(..., description="Image: path or base64.")
    resize_mode: int = Field(
        0, ge=0, le=1, description="0 scale by upscaling_resize, 1 scale to width/height"
    )
    upscaling_resize: float = Field(2.0, ge=1.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=64, le=16384)
    upscaling_resize_h: int = Field(512, ge=64, le=16384)
    upscaling_crop: bool = True
    upscaler_1: str = Field(
        "None",
        description="Upscaler name: Lanczos, Nearest, a models/ESRGAN file or an 'SD x4 (...)' model.",
    )
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)
    upscale_first: bool = False
    show_extras_results: bool = True
    # Settings of the Stable Diffusion x4 upscaler ("SD x4 (...)" upscalers); other upscalers ignore them.
    sd_upscale_prompt: str = Field(
        "", description="SD x4 upscaler: text describing the image, to guide the added detail."
    )
    sd_upscale_negative_prompt: str = Field("", description="SD x4 upscaler: what to avoid.")
    sd_upscale_noise_level: int = Field(
        20, ge=0, le=350, description="SD x4 upscaler: noise added to the input; higher invents more detail."
    )
    sd_upscale_steps: int = Field(20, ge=1, le=150, description="SD x4 upscaler: denoising steps.")
    sd_upscale_cfg_scale: float = Field(
        9.0, ge=0.0, le=30.0, description="SD x4 upscaler: guidance scale (used only with a prompt)."
    )
    sd_upscale_seed: int = Field(
        0, ge=RANDOM_SEED, le=MAX_SEED, description="SD x4 upscaler: seed (same seed, same image); -1 random."
    )

    @model_validator(mode="after")
    def _within_memory_budget(self) -> ExtrasRequest:
        """The input image (from its header), the upscaled output and each upscaler's intermediate
        image against the memory budget, before anything is decoded or allocated."""
        size = checked_image_size("image", self.image)
        upscalers = [name for name in (self.upscaler_1, self.upscaler_2) if name and name != "None"]
        if not upscalers:
            return self  # no upscale: the engine returns the image at its own size
        if self.resize_mode == 0:
            if size is None:
                return self
            field = "upscaling_resize"
            factor = self.upscaling_resize
            output = (size[0] * factor, size[1] * factor)
        else:
            field = "upscaling_resize_w"
            output = (self.upscaling_resize_w, self.upscaling_resize_h)
            if size is None:
                check_pixels(field, "the upscaled image", *output)
                return self
            factor = max(output[0] / size[0], output[1] / size[1])
        check_pixels(field, "the upscaled image", *output)
        for name in upscalers:
            side = _upscaler_intermediate_factor(name, factor)
            if side > factor:
                which = "upscaler_1" if name == self.upscaler_1 else "upscaler_2"
                check_pixels(
                    which, f"'{name}' works at an intermediate size that", size[0] * side, size[1] * side
                )
        return self


def _upscaler_intermediate_factor(name: str, factor: float) -> float:
    """How much larger than the input an upscaler's largest image gets on the way to ``factor``:
    Lanczos/Nearest resize directly, an SD x4 upscaler runs once at 4x, a model upscaler repeats its
    native scale (taken as 4x, the usual one: the model is not opened to validate a request)."""
    if name in ("Lanczos", "Nearest"):
        return factor
    if name.startswith("SD x4"):
        return max(factor, 4.0)
    return max(factor, model_upscale_side_factor(factor))


JobRequest = Txt2ImgRequest | Img2ImgRequest | ExtrasRequest
REQUEST_TYPES: dict[str, type[BaseModel]] = {
    "txt2img": Txt2ImgRequest,
    "img2img": Img2ImgRequest,
    "extras": ExtrasRequest,
}


def parse_request(payload: dict[str, Any]) -> JobRequest:
    """Build the right request model from a JSON object (``mode`` picks it; txt2img by default)."""
    mode = str(payload.get("mode", "img2img" if "init_images" in payload else "txt2img"))
    model = REQUEST_TYPES.get(mode)
    if model is None:
        raise ValueError(f"mode: unknown mode '{mode}'; choose one of {', '.join(REQUEST_TYPES)}")
    return model.model_validate({**payload, "mode": mode})  # type: ignore[return-value]
