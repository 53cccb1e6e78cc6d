"""Applying ControlNet units to a diffusers pipeline.

**Units** are the extension's API units (:class:`contract.controlnet.ControlNetUnit`);
:func:`prepare_control_inputs` turns enabled units into the arguments of a diffusers
``StableDiffusion[XL]ControlNetPipeline`` and :func:`build_controlnet_pipeline` builds that
pipeline from the loaded checkpoint's components.

Control modes on diffusers (the extension's ``hook.py`` semantics):

* ``Balanced``: every ControlNet residual is multiplied by the unit weight, for both halves of the
  classifier-free-guidance batch: diffusers' plain behaviour.
* ``My prompt is more important``: "soft injection": residual ``i`` of the 13 (SD1/SD2; SDXL
  uses the first 10) is additionally scaled by ``0.825 ** (12 - i)``, so deep layers keep more
  control than shallow ones. diffusers has no per-unit option for this; we wrap the unit's model
  in an adapter that applies exactly these factors.
* ``ControlNet is more important``: soft injection *and* the control goes only into the
  conditional half of the CFG batch. That is diffusers' ``guess_mode`` (whose factors
  ``10 ** (-(12 - i) / 12) = 0.8254 ** (12 - i)`` match the extension's to within 0.6%), used when
  every unit of an SD1/SD2 job is in this mode; otherwise (mixed modes, or SDXL, where diffusers'
  factors differ) the same adapter zeroes the unconditional half for that unit only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contract.controlnet import ControlNetUnit
from pipelines.controlnet.image_prep import image_to_array
from pipelines.controlnet.model_files import (
    ControlNetCache,
    LoadedControlNet,
    check_controlnet_family,
    family_base,
)
from pipelines.controlnet.preprocessors import (
    detect_control_map,
    pixel_perfect_resolution,
    resize_control_image,
    resolve_preprocessor,
)
from pipelines.errors import ControlNetError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipelines.controlnet.annotators import AnnotatorCache
    from pipelines.models.families import ModelFamily

SOFT_INJECTION_BASE = 0.825
"""The extension's "soft injection" factor: residual ``i`` of 13 is scaled by ``0.825 ** (12 - i)``."""


def load_unit_image(
    value: str, *, image_dirs: Sequence[Path] | None = None, label: str = "ControlNet unit"
) -> Image.Image:
    """Decode a unit's ``image``: an existing file path (restricted to ``image_dirs`` when given,
    e.g. for requests from the network) or base64 data, with or without a ``data:`` prefix."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    text = value.strip()
    if len(text) < 4096 and "\n" not in text and not text.startswith("data:"):
        candidate = Path(text).expanduser()
        try:
            is_file = candidate.is_file()
        except OSError:
            is_file = False
        if is_file:
            if image_dirs is not None:
                resolved = candidate.resolve()
                if not any(resolved.is_relative_to(Path(d).resolve()) for d in image_dirs):
                    raise ControlNetError(f"{label}: image path {text} is outside the allowed folders.")
            try:
                with PILImage.open(candidate) as opened:
                    opened.load()
                    return opened.copy()
            except (OSError, UnidentifiedImageError) as exc:
                raise ControlNetError(f"{label}: {candidate.name} is not a readable image ({exc}).") from exc
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload, validate=False)
        with PILImage.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.copy()
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as exc:
        raise ControlNetError(
            f"{label}: image is neither an existing file nor base64-encoded image data."
        ) from exc


def soft_injection_scales(count: int) -> list[float]:
    """The extension's per-residual factors for "soft injection": the first ``count`` of
    ``0.825 ** (12 - i)`` for ``i`` in 0..12 (SD: all 13, SDXL: the first 10)."""
    scales = [SOFT_INJECTION_BASE ** float(12 - i) for i in range(13)]
    return (scales + [1.0] * max(0, count - 13))[:count]


@functools.cache
def _control_mode_adapter_class() -> type:
    """Built on first use so that importing this module does not import torch."""
    import torch
    from diffusers.models.controlnets.controlnet import ControlNetOutput

    class ControlModeAdapter(torch.nn.Module):
        """Wraps one unit's ControlNetModel inside a ``MultiControlNetModel`` to give it the
        extension's per-unit control mode: soft per-layer weights, and for "ControlNet is more
        important" control on the conditional half of the CFG batch only (the unconditional half
        gets zero residuals, as diffusers' guess mode does for all units at once)."""

        def __init__(
            self, controlnet: Any, *, soft: bool, cond_only: bool, classifier_free_guidance: bool
        ) -> None:
            super().__init__()
            self.controlnet = controlnet
            self.soft = soft
            self.cond_only = cond_only
            self.classifier_free_guidance = classifier_free_guidance

        @property
        def config(self) -> Any:  # the pipeline reads nets[i].config.global_pool_conditions
            return self.controlnet.config

        def forward(
            self,
            sample: torch.Tensor,
            timestep: Any,
            encoder_hidden_states: torch.Tensor,
            controlnet_cond: torch.Tensor,
            conditioning_scale: float = 1.0,
            class_labels: Any = None,
            timestep_cond: Any = None,
            attention_mask: Any = None,
            added_cond_kwargs: dict[str, Any] | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            guess_mode: bool = False,
            return_dict: bool = True,
        ) -> Any:
            batch = sample.shape[0]
            # In guess mode the pipeline already passes the conditional half only.
            split = self.cond_only and self.classifier_free_guidance and not guess_mode and batch % 2 == 0
            half = batch // 2

            def conditional(value: Any) -> Any:
                if split and isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                    return value[half:]
                return value

            down, mid = self.controlnet(
                conditional(sample),
                conditional(timestep),
                encoder_hidden_states=conditional(encoder_hidden_states),
                controlnet_cond=conditional(controlnet_cond),
                conditioning_scale=conditioning_scale,
                class_labels=conditional(class_labels),
                timestep_cond=conditional(timestep_cond),
                attention_mask=conditional(attention_mask),
                added_cond_kwargs=(
                    {k: conditional(v) for k, v in added_cond_kwargs.items()}
                    if added_cond_kwargs
                    else added_cond_kwargs
                ),
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if self.soft:
                scales = soft_injection_scales(len(down) + 1)
                down = [residual * scale for residual, scale in zip(down, scales, strict=False)]
                mid = mid * scales[len(down)]
            if split:
                down = [torch.cat([torch.zeros_like(r), r]) for r in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            if not return_dict:
                return down, mid
            return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)

    return ControlModeAdapter


def wrap_for_control_mode(
    controlnet: Any, control_mode: str, *, classifier_free_guidance: bool = True
) -> Any:
    """``controlnet`` itself for "Balanced", else a :class:`ControlModeAdapter` around it."""
    if control_mode == "Balanced":
        return controlnet
    adapter = _control_mode_adapter_class()
    return adapter(
        controlnet,
        soft=True,
        cond_only=control_mode == "ControlNet is more important",
        classifier_free_guidance=classifier_free_guidance,
    )


@dataclass
class ControlInputs:
    """What a diffusers ControlNet pipeline needs for one job, one entry per enabled unit."""

    controlnet: Any  # ControlNetModel (one Balanced unit) or MultiControlNetModel
    images: list[Image.Image]
    conditioning_scale: list[float]
    guidance_start: list[float]
    guidance_end: list[float]
    guess_mode: bool
    units: list[ControlNetUnit] = field(default_factory=list)
    models: list[LoadedControlNet] = field(default_factory=list)
    detected_maps: list[Image.Image] = field(default_factory=list)
    """The preprocessor outputs before fitting to the generation size (the extension returns
    these to API clients as "detected maps")."""

    def pipeline_kwargs(self, mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img") -> dict[str, Any]:
        """Keyword arguments for the pipeline call (the ``controlnet`` itself goes to the pipeline's
        constructor; see :func:`build_controlnet_pipeline`). diffusers' img2img and inpaint
        ControlNet pipelines take the control image as ``control_image`` (``image`` is the init
        image there)."""
        single = len(self.images) == 1 and not hasattr(self.controlnet, "nets")
        image_key = "image" if mode == "txt2img" else "control_image"
        return {
            image_key: self.images[0] if single else list(self.images),
            "controlnet_conditioning_scale": self.conditioning_scale[0]
            if single
            else list(self.conditioning_scale),
            "control_guidance_start": list(self.guidance_start),
            "control_guidance_end": list(self.guidance_end),
            "guess_mode": self.guess_mode,
        }


def prepare_control_inputs(
    units: Sequence[ControlNetUnit],
    controlnet_cache: ControlNetCache,
    *,
    width: int,
    height: int,
    family: ModelFamily | str,
    annotator_dir: Path | Sequence[Path] | None = None,
    image_dirs: Sequence[Path] | None = None,
    fallback_image: Image.Image | None = None,
    device: Any = None,
    dtype: Any = None,
    classifier_free_guidance: bool = True,
    annotators: AnnotatorCache | None = None,
) -> ControlInputs | None:
    """Preprocess each enabled unit's image, fit it to ``width`` x ``height``, load its model and
    assemble the pipeline inputs. ``None`` when no unit is enabled.

    ``annotators`` holds the preprocessors' loaded networks between jobs (the engine's cache).

    ``fallback_image`` is used by units without an image (the extension uses the img2img input).
    ``classifier_free_guidance`` must say whether the job uses CFG (cfg_scale > 1): it decides how
    "ControlNet is more important" is applied. Models are moved to ``device``/``dtype``.
    """
    import numpy as np
    from PIL import Image as PILImage

    enabled = [(index, unit) for index, unit in enumerate(units) if unit.enabled]
    if not enabled:
        return None
    base = family_base(family)
    images: list[Image.Image] = []
    detected_maps: list[Image.Image] = []
    models: list[LoadedControlNet] = []
    for index, unit in enabled:
        label = f"ControlNet Unit {index}"
        if not unit.uses_model:
            raise ControlNetError(
                f"{label}: no model selected. Choose one from models/ControlNet (field 'model')."
            )
        if unit.image:
            source = load_unit_image(unit.image, image_dirs=image_dirs, label=label)
        elif fallback_image is not None:
            source = fallback_image
        else:
            raise ControlNetError(
                f"{label}: no control image (field 'image'). Upload one or give a file path."
            )
        pixels = image_to_array(source)
        _, preprocessor = resolve_preprocessor(unit.module)
        if unit.pixel_perfect:
            resolution = pixel_perfect_resolution(
                pixels.shape[0], pixels.shape[1], width=width, height=height, resize_mode=unit.resize_mode
            )
        elif preprocessor.resolution is not None:
            resolution = int(preprocessor.resolution.clamp_or_default(unit.processor_res))
        else:
            resolution = 512
        detected = detect_control_map(
            preprocessor, pixels, resolution, unit.threshold_a, unit.threshold_b, annotator_dir, annotators
        )
        fitted = resize_control_image(
            np.asarray(detected), width=width, height=height, resize_mode=unit.resize_mode
        )
        detected_maps.append(detected)
        images.append(PILImage.fromarray(fitted, mode="RGB"))
        try:
            loaded = controlnet_cache.get(unit.model, device=device, dtype=dtype)
            check_controlnet_family(loaded, family)
        except ControlNetError as exc:
            raise type(exc)(f"{label}: {exc}") from exc
        models.append(loaded)

    modes = [unit.control_mode for _, unit in enabled]
    guess_mode = all(m == "ControlNet is more important" for m in modes) and base in ("sd1", "sd2")
    if guess_mode or all(m == "Balanced" for m in modes):
        nets = [loaded.model for loaded in models]
    else:
        nets = [
            wrap_for_control_mode(loaded.model, mode, classifier_free_guidance=classifier_free_guidance)
            for loaded, mode in zip(models, modes, strict=True)
        ]
    if len(nets) == 1 and nets[0] is models[0].model:
        controlnet: Any = nets[0]
    else:
        from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

        controlnet = MultiControlNetModel(nets)
    return ControlInputs(
        controlnet=controlnet,
        images=images,
        conditioning_scale=[float(unit.weight) for _, unit in enabled],
        guidance_start=[float(unit.guidance_start) for _, unit in enabled],
        guidance_end=[float(unit.guidance_end) for _, unit in enabled],
        guess_mode=guess_mode,
        units=[unit for _, unit in enabled],
        models=models,
        detected_maps=detected_maps,
    )


def build_controlnet_pipeline(
    pipe: Any, controlnet: Any, *, mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
) -> Any:
    """The diffusers ControlNet pipeline sharing ``pipe``'s components (no copies, no loading)."""
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    is_sdxl = (
        getattr(pipe, "text_encoder_2", None) is not None or getattr(pipe, "tokenizer_2", None) is not None
    )
    classes = {
        (False, "txt2img"): StableDiffusionControlNetPipeline,
        (False, "img2img"): StableDiffusionControlNetImg2ImgPipeline,
        (False, "inpaint"): StableDiffusionControlNetInpaintPipeline,
        (True, "txt2img"): StableDiffusionXLControlNetPipeline,
        (True, "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
        (True, "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
    }
    cls = classes[(is_sdxl, mode)]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    components = {name: value for name, value in pipe.components.items() if name in accepted}
    components["controlnet"] = controlnet
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in accepted:
            components.setdefault(optional, None)
    if "requires_safety_checker" in accepted:
        components["requires_safety_checker"] = getattr(pipe, "safety_checker", None) is not None
    if "add_watermarker" in accepted:
        components["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    controlled = cls(**components)
    controlled.set_progress_bar_config(disable=True)
    return controlled
