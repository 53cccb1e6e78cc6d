"""Tell a checkpoint's model family from its tensor names and shapes.

Single-file checkpoints carry no config, so like A1111 we look at signature keys: the text
encoder's layout separates SD1.x (OpenAI CLIP), SD2.x (OpenCLIP) and SDXL (two encoders), and
the UNet's first convolution's input channels separate ordinary (4), inpainting (9) and
instruct-pix2pix (8) models. A ``<checkpoint>.yaml`` sidecar (original LDM config) or a
``v_pred`` marker key overrides the prediction type, as in A1111.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Base = Literal["sd1", "sd2", "sdxl", "sdxl-refiner"]
Variant = Literal["normal", "inpaint", "edit"]
Prediction = Literal["epsilon", "v_prediction"]

UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_SD1_TEXT_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.embeddings.token_embedding.weight",
)
_SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
_SDXL_TEXT_KEY = "conditioner.embedders.1.model.token_embedding.weight"
_REFINER_TEXT_KEY = "conditioner.embedders.0.model.token_embedding.weight"

_BASE_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}


class UnknownFamilyError(ValueError):
    """The tensors match no supported Stable Diffusion family."""


@dataclass(frozen=True)
class ModelFamily:
    base: Base
    variant: Variant = "normal"
    prediction: Prediction = "epsilon"

    @property
    def config_name(self) -> str:
        """The folder under ``configs/`` holding this family's component configs."""
        if self.base == "sd2" and self.variant == "normal":
            return "sd2" if self.prediction == "v_prediction" else "sd2-base"
        if self.variant == "inpaint" and self.base in ("sd1", "sd2", "sdxl"):
            return f"{self.base}-inpaint"
        return self.base

    @property
    def is_sdxl(self) -> bool:
        return self.base in ("sdxl", "sdxl-refiner")

    @property
    def label(self) -> str:
        parts = [_BASE_LABELS[self.base]]
        if self.variant == "inpaint":
            parts.append("inpainting")
        elif self.variant == "edit":
            parts.append("instruct-pix2pix")
        if self.prediction == "v_prediction":
            parts.append("(v-prediction)")
        return " ".join(parts)


def _variant_from_in_channels(channels: int | None) -> Variant:
    if channels == 9:
        return "inpaint"
    if channels == 8:
        return "edit"
    return "normal"


def prediction_from_original_config(config: Mapping[str, Any]) -> Prediction | None:
    """``model.params.parameterization: v`` in an LDM yaml means v-prediction."""
    params = (config.get("model") or {}).get("params") or {}
    parameterization = params.get("parameterization")
    if parameterization is None:
        # SGM (SDXL) configs name the denoiser weighting instead.
        denoiser = str(
            ((params.get("denoiser_config") or {}).get("params") or {}).get("weighting_config", "")
        )
        return "v_prediction" if "VWeighting" in denoiser else None
    return "v_prediction" if str(parameterization) == "v" else "epsilon"


def detect_family(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    original_config: Mapping[str, Any] | None = None,
    name: str = "checkpoint",
) -> ModelFamily:
    """Classify an LDM-layout state dict given as ``{key: shape}``."""
    if _SDXL_TEXT_KEY in shapes:
        base: Base = "sdxl"
    elif _REFINER_TEXT_KEY in shapes:
        base = "sdxl-refiner"
    elif _SD2_TEXT_KEY in shapes:
        base = "sd2"
    elif any(key in shapes for key in _SD1_TEXT_KEYS):
        base = "sd1"
    elif UNET_IN_KEY in shapes:
        raise UnknownFamilyError(
            f"{name}: has a UNet but no text encoder; it looks like a UNet-only file, not a full "
            "checkpoint. Put full checkpoints in models/Stable-diffusion."
        )
    else:
        raise UnknownFamilyError(
            f"{name}: not a Stable Diffusion checkpoint (no UNet or text-encoder keys found). "
            "LoRA files go in models/Lora, VAEs in models/VAE, ControlNets in models/ControlNet."
        )
    in_shape = shapes.get(UNET_IN_KEY)
    variant = _variant_from_in_channels(in_shape[1] if in_shape and len(in_shape) > 1 else None)

    prediction: Prediction | None = None
    if original_config is not None:
        prediction = prediction_from_original_config(original_config)
    if prediction is None and "v_pred" in shapes:
        prediction = "v_prediction"
    if prediction is None:
        # SD2.x 768 models (the common ones) are v-prediction; 512-base and inpainting are not.
        prediction = "v_prediction" if base == "sd2" and variant == "normal" else "epsilon"
    return ModelFamily(base=base, variant=variant, prediction=prediction)


def detect_diffusers_family(
    model_index: Mapping[str, Any], component_configs: Mapping[str, Mapping]
) -> ModelFamily:
    """Classify a diffusers folder from ``model_index.json`` and its component configs."""
    class_name = str(model_index.get("_class_name", ""))
    unet = component_configs.get("unet", {})
    text = component_configs.get("text_encoder", {})
    scheduler = component_configs.get("scheduler", {})
    if "XL" in class_name:
        base: Base = "sdxl" if model_index.get("text_encoder") not in (None, [None, None]) else "sdxl-refiner"
    elif str(text.get("hidden_act", "quick_gelu")) == "gelu":
        base = "sd2"
    else:
        base = "sd1"
    variant = _variant_from_in_channels(unet.get("in_channels"))
    prediction: Prediction = (
        "v_prediction" if scheduler.get("prediction_type") == "v_prediction" else "epsilon"
    )
    return ModelFamily(base=base, variant=variant, prediction=prediction)
