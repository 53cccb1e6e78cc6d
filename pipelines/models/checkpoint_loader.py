"""Load a checkpoint (single file or diffusers folder) into a diffusers pipeline, offline.

Single files are in the original LDM/SGM key layout. We build each component's config from the
configs shipped in ``configs/<family>/`` (or from a ``<checkpoint>.yaml`` sidecar, as A1111 does),
convert the weights with diffusers' own converters, and assemble the stock diffusers pipeline
class for the family. Text-encoder shapes are read from the weights themselves, so unusual
(or tiny test) models load as long as their layout is standard. Nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import CheckpointLoadError
from pipelines.models.families import ModelFamily, detect_family, prediction_from_original_config
from pipelines.models.family_configs import load_component_config
from pipelines.models.registry import ModelEntry
from pipelines.models.safetensors_header import read_safetensors_header
from pipelines.models.weight_files import read_state_dict
from pipelines.prompts.tokenizer import build_clip_tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TEXT_ENCODER_METADATA_KEYS = ("text_encoder_config", "text_encoder_2_config")
_SD1_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_OPEN_CLIP_PREFIX = {
    "sd2": "cond_stage_model.model.",
    "sdxl": "conditioner.embedders.1.model.",
    "sdxl-refiner": "conditioner.embedders.0.model.",
}


@dataclass
class LoadedCheckpoint:
    """A pipeline assembled from one checkpoint, plus what the engine needs to describe it."""

    entry: ModelEntry
    family: ModelFamily
    pipe: Any  # a diffusers DiffusionPipeline
    sha256: str | None = None
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict)  # task pipelines sharing this one's weights

    def __post_init__(self) -> None:
        # Remember the checkpoint's own scheduler config before jobs swap schedulers in.
        if not self.scheduler_config and self.pipe is not None and hasattr(self.pipe, "scheduler"):
            self.scheduler_config = dict(self.pipe.scheduler.config)

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------
def _normalise_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Older SD1 checkpoints lack the ``text_model.`` level in CLIP keys; add it back."""
    old = "cond_stage_model.transformer.embeddings."
    if any(k.startswith(old) for k in state_dict):
        fixed = {}
        for key, value in state_dict.items():
            if key.startswith("cond_stage_model.transformer.") and not key.startswith(
                "cond_stage_model.transformer.text_model."
            ):
                key = key.replace(
                    "cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1
                )
            fixed[key] = value
        return fixed
    return state_dict


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _shipped(family: ModelFamily, component: str) -> dict[str, Any]:
    return dict(load_component_config(family.config_name, component))


def _unet_and_vae_configs(
    family: ModelFamily, state_dict: Mapping[str, Any], original_config: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    if original_config is None:
        unet = _shipped(family, "unet")
        first_conv = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
        if first_conv is not None and first_conv.ndim == 4:
            # instruct-pix2pix (8) and other variants without a shipped config of their own
            unet["in_channels"] = int(first_conv.shape[1])
        return unet, _shipped(family, "vae")
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    try:
        unet = create_unet_diffusers_config_from_ldm(original_config, state_dict)
        vae = create_vae_diffusers_config_from_ldm(original_config, state_dict)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointLoadError(
            f"the .yaml config next to the checkpoint is not an LDM config ({exc})."
        ) from exc
    unet = dict(unet)
    if family.is_sdxl:
        unet.update(_sdxl_conditioning_from_yaml(original_config))
    if family.config_name == "sd2":
        # SD2.x 768-v needs attention upcast; the LDM yaml does not say so but the hub config does.
        unet["upcast_attention"] = True
    return unet, dict(vae)


def _sdxl_conditioning_from_yaml(original_config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers recognises SDXL's size/crop conditioning only for the stock context widths, so
    read it from the SGM yaml's ``ConcatTimestepEmbedderND`` entries and ``adm_in_channels``."""
    params = (original_config.get("model") or {}).get("params") or {}
    network = (params.get("network_config") or {}).get("params") or {}
    embedders = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    outdims = [
        ((e.get("params") or {}).get("outdim"))
        for e in embedders
        if "ConcatTimestepEmbedderND" in str(e.get("target"))
    ]
    if not network.get("adm_in_channels") or not outdims:
        return {}
    return {
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": int(outdims[0]),
        "projection_class_embeddings_input_dim": int(network["adm_in_channels"]),
    }


def _scheduler_config(family: ModelFamily, original_config: Mapping[str, Any] | None) -> dict[str, Any]:
    config = _shipped(family, "scheduler")
    config["prediction_type"] = family.prediction
    if original_config is not None and not family.is_sdxl:
        params = (original_config.get("model") or {}).get("params") or {}
        if "linear_start" in params and "linear_end" in params:
            config["beta_start"] = float(params["linear_start"])
            config["beta_end"] = float(params["linear_end"])
        config["num_train_timesteps"] = int(params.get("timesteps", config.get("num_train_timesteps", 1000)))
    return config


def _text_config(
    diffusers_sd: Mapping[str, Any],
    *,
    family: ModelFamily,
    component: str,
    metadata: Mapping[str, str],
    with_projection: bool,
) -> dict[str, Any]:
    """A CLIP text config matching the weights: the shipped one when shapes agree, else inferred."""
    meta_key = "text_encoder_config" if component == "text_encoder" else "text_encoder_2_config"
    if meta_key in metadata:
        return json.loads(metadata[meta_key])
    token = diffusers_sd["embeddings.token_embedding.weight"]
    vocab, hidden = token.shape
    layers = 1 + max(
        int(k.split(".")[2])
        for k in diffusers_sd
        if k.startswith("encoder.layers.") and k.endswith("q_proj.weight")
    )
    intermediate = diffusers_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    positions = diffusers_sd["embeddings.position_embedding.weight"].shape[0]
    try:
        shipped = _shipped(family, component)
    except (KeyError, FileNotFoundError, ValueError):
        shipped = {}
    if (
        shipped.get("hidden_size") == hidden
        and shipped.get("num_hidden_layers") == layers
        and shipped.get("vocab_size") == vocab
        and shipped.get("intermediate_size") == intermediate
    ):
        return shipped
    open_clip = component == "text_encoder_2" or family.base == "sd2"
    config: dict[str, Any] = {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": int(layers),
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(positions),
        "hidden_act": "gelu" if open_clip else "quick_gelu",
        "bos_token_id": 0 if open_clip else 49406,
        "eos_token_id": 2 if open_clip else 49407,
        "pad_token_id": 1,
    }
    if with_projection and "text_projection.weight" in diffusers_sd:
        config["projection_dim"] = int(diffusers_sd["text_projection.weight"].shape[0])
    log.warning(
        "text encoder shapes differ from the %s config; using inferred config %s", family.config_name, config
    )
    return config


# --------------------------------------------------------------------------------------------
# building modules
# --------------------------------------------------------------------------------------------
def _materialise(model: Any, state_dict: Mapping[str, Any], dtype: torch.dtype, what: str, name: str) -> Any:
    """Load weights into a model built on the meta device, strictly, casting to ``dtype``."""
    expected = model.state_dict()
    usable = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items() if k in expected}
    missing = [k for k in expected if k not in usable and not k.endswith("position_ids")]
    if missing:
        raise CheckpointLoadError(
            f"{name}: the {what} weights are incomplete ({len(missing)} missing, e.g. {missing[:3]}). "
            "The file is damaged or not a standard checkpoint."
        )
    for key, tensor in usable.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointLoadError(
                f"{name}: {what} tensor {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[key].shape)}. Add a matching .yaml config next to the checkpoint."
            )
    model.load_state_dict(usable, strict=False, assign=True)
    model.to(dtype=dtype)
    model.eval()
    return model


def _empty(factory: Any) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _build_unet(config: dict[str, Any], sd: Mapping[str, Any], dtype: torch.dtype, name: str) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint(sd, config)
    model = _empty(lambda: UNet2DConditionModel.from_config(config))
    return _materialise(model, converted, dtype, "UNet", name)


def _build_vae(config: dict[str, Any], sd: Mapping[str, Any], dtype: torch.dtype, name: str) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(sd, config)
    model = _empty(lambda: AutoencoderKL.from_config(config))
    return _materialise(model, converted, dtype, "VAE", name)


class _ConfigHolder:
    """``convert_open_clip_checkpoint`` only reads ``model.config.hidden_size``."""

    def __init__(self, hidden_size: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def _build_text_encoder(
    family: ModelFamily,
    component: str,
    sd: Mapping[str, Any],
    metadata: Mapping[str, str],
    dtype: torch.dtype,
    name: str,
) -> Any:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    open_clip = component == "text_encoder_2" or family.base == "sd2"
    if open_clip:
        prefix = _OPEN_CLIP_PREFIX[family.base]
        hidden = sd[prefix + "token_embedding.weight"].shape[1]
        converted = convert_open_clip_checkpoint(_ConfigHolder(hidden), sd, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint(sd)
        converted = {k: v for k, v in converted.items() if not k.startswith(("model.", "transformer."))}
    flat = {k.removeprefix("text_model."): v for k, v in converted.items()}
    with_projection = component == "text_encoder_2"
    config = _text_config(
        flat, family=family, component=component, metadata=metadata, with_projection=with_projection
    )
    text_config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = _empty(lambda: cls(text_config))
    own_keys = model.state_dict().keys()
    if any(k.startswith("text_model.") for k in own_keys):
        weights = {
            ("text_model." + k if not k.startswith("text_projection") else k): v for k, v in flat.items()
        }
    else:
        weights = flat
    return _materialise(model, weights, dtype, component.replace("_", " "), name)


def _pipeline_class(family: ModelFamily) -> Any:
    import diffusers

    if family.base == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline
    if family.is_sdxl:
        return (
            diffusers.StableDiffusionXLInpaintPipeline
            if family.variant == "inpaint"
            else diffusers.StableDiffusionXLPipeline
        )
    if family.variant == "inpaint":
        return diffusers.StableDiffusionInpaintPipeline
    if family.variant == "edit":
        return diffusers.StableDiffusionInstructPix2PixPipeline
    return diffusers.StableDiffusionPipeline


def assemble_pipeline(family: ModelFamily, components: dict[str, Any]) -> Any:
    cls = _pipeline_class(family)
    if family.is_sdxl:
        extra: dict[str, Any] = {}
        if family.base == "sdxl-refiner":
            extra["requires_aesthetics_score"] = True
        return cls(**components, **extra)
    return cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def load_single_file(
    path: Path,
    *,
    family: ModelFamily | None = None,
    original_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, ModelFamily]:
    """Build a diffusers pipeline from an LDM-layout checkpoint file."""
    import torch
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    dtype = dtype or torch.float32
    name = path.name
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        metadata = read_safetensors_header(path).metadata
    state_dict = _normalise_keys(read_state_dict(path))
    if family is None:
        family = detect_family(
            {k: tuple(v.shape) for k, v in state_dict.items()}, original_config=original_config, name=name
        )
    try:
        unet_config, vae_config = _unet_and_vae_configs(family, state_dict, original_config)
        components: dict[str, Any] = {
            "unet": _build_unet(unet_config, state_dict, dtype, name),
            "vae": _build_vae(vae_config, state_dict, dtype, name),
        }
        scheduler_config = _scheduler_config(family, original_config)
        scheduler_cls = EulerDiscreteScheduler if family.is_sdxl else PNDMScheduler
        components["scheduler"] = scheduler_cls.from_config(scheduler_config)
        if family.base == "sdxl-refiner":
            components["text_encoder_2"] = _build_text_encoder(
                family, "text_encoder_2", state_dict, metadata, dtype, name
            )
            components["tokenizer_2"] = build_clip_tokenizer(pad_token="!")
        elif family.is_sdxl:
            components["text_encoder"] = _build_text_encoder(
                family, "text_encoder", state_dict, metadata, dtype, name
            )
            components["text_encoder_2"] = _build_text_encoder(
                family, "text_encoder_2", state_dict, metadata, dtype, name
            )
            components["tokenizer"] = build_clip_tokenizer()
            components["tokenizer_2"] = build_clip_tokenizer(pad_token="!")
        else:
            components["text_encoder"] = _build_text_encoder(
                family, "text_encoder", state_dict, metadata, dtype, name
            )
            components["tokenizer"] = build_clip_tokenizer(
                pad_token="!" if family.base == "sd2" else "<|endoftext|>"
            )
    except CheckpointLoadError:
        raise
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointLoadError(
            f"{name}: cannot build a {family.label} model from this file ({exc.__class__.__name__}: {exc}). "
            "If it is a non-standard architecture, put its original .yaml config next to it."
        ) from exc
    return assemble_pipeline(family, components), family


def load_diffusers_folder(path: Path, *, family: ModelFamily, dtype: torch.dtype | None = None) -> Any:
    """``from_pretrained`` with no network; tokenizers are rebuilt offline when the folder lacks them."""
    import torch

    cls = _pipeline_class(family)
    overrides: dict[str, Any] = {}
    for component, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = path / component
        if (path / "model_index.json").is_file() and component in json.loads(
            (path / "model_index.json").read_text(encoding="utf-8")
        ):
            has_vocab = (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()
            if not has_vocab:
                overrides[component] = build_clip_tokenizer(pad_token="!" if family.base == "sd2" else pad)
    if not family.is_sdxl:
        overrides.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(
            str(path),
            torch_dtype=dtype or torch.float32,
            local_files_only=True,
            use_safetensors=True,
            **overrides,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointLoadError(f"{path.name}: cannot load this diffusers folder ({exc}).") from exc


def load_checkpoint(entry: ModelEntry, *, family: ModelFamily, dtype: torch.dtype | None = None) -> Any:
    """Load a registry entry into a pipeline (raises ``CheckpointLoadError`` on any bad file)."""
    import yaml

    if entry.file_format == "diffusers":
        return load_diffusers_folder(entry.path, family=family, dtype=dtype)
    original_config = None
    if entry.sidecar_yaml is not None:
        try:
            original_config = yaml.safe_load(entry.sidecar_yaml.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CheckpointLoadError(
                f"{entry.sidecar_yaml.name}: cannot read this yaml config ({exc})."
            ) from exc
        if prediction_from_original_config(original_config or {}) is None and not isinstance(
            original_config, dict
        ):
            raise CheckpointLoadError(f"{entry.sidecar_yaml.name}: not an LDM config.")
    pipe, _ = load_single_file(entry.path, family=family, original_config=original_config, dtype=dtype)
    return pipe
