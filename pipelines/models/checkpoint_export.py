"""Export a diffusers Stable Diffusion pipeline as an original-layout single-file checkpoint.

A1111, ComfyUI, Forge and diffusers' own ``from_single_file`` read checkpoints in the key layout of
the original CompVis LDM (SD1.x), Stability's LDM fork (SD2.x) and Stability's SGM (SDXL) code
bases: one ``.safetensors`` file whose keys start with ``model.diffusion_model.`` (UNet),
``first_stage_model.`` (VAE) and ``cond_stage_model.`` / ``conditioner.embedders.N.`` (text
encoders), next to an optional ``.yaml`` inference config. This module renames the weights of a
diffusers pipeline into that layout and writes the yaml that describes its architecture.

Every mapping is derived from the component configs (block counts, layers per block, attention
placement), so it works for the full-size models and for the tiny random-weight ones the tests use.
The inverse direction is diffusers' ``diffusers.loaders.single_file_utils``; the tests check that
our output round-trips through it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import StudioError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

MODEL_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_ENCODER_PREFIX = "cond_stage_model.model."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

# The original UNet and VAE hard-code GroupNorm(32, channels) and SiLU.
_LDM_NORM_GROUPS = 32

_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPEN_CLIP_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

# UNet config values the original UNetModel cannot express, with the value it hard-codes.
_UNET_FIXED_FIELDS: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": _LDM_NORM_GROUPS,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
}
_VAE_FIXED_FIELDS: dict[str, Any] = {
    "act_fn": "silu",
    "norm_num_groups": _LDM_NORM_GROUPS,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


class CheckpointExportError(StudioError, ValueError):
    """The pipeline has a component or setting the original single-file layout cannot hold."""


# --------------------------------------------------------------------------------------------
# Key renaming machinery
# --------------------------------------------------------------------------------------------

_Rename = Callable[[str], str]


def _keep(name: str) -> str:
    return name


def _rename_first(renames: Mapping[str, str]) -> _Rename:
    """Rename the leading module of a parameter path (``norm1.weight`` -> ``in_layers.0.weight``)."""

    def rename(name: str) -> str:
        for old, new in renames.items():
            if name.startswith(old + "."):
                return new + name[len(old) :]
        return name

    return rename


def _apply_module_map(
    state_dict: Mapping[str, torch.Tensor],
    module_map: Mapping[str, tuple[str, _Rename]],
    component: str,
) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching diffusers module prefix.

    A key that no prefix covers means the model has a part the original layout has no place
    for; we refuse rather than silently drop weights.
    """
    prefixes = sorted(module_map, key=len, reverse=True)
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix + "."):
                target, rename = module_map[prefix]
                converted[f"{target}.{rename(key[len(prefix) + 1 :])}"] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (" ..." if len(unmapped) > 5 else "")
        raise CheckpointExportError(
            f"The {component} has weights the original single-file layout has no place for "
            f"({len(unmapped)} keys: {shown}). Save this model as a diffusers folder instead."
        )
    return converted


def _as_list(value: int | Sequence[int], count: int) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    return list(value)


def _check_fixed_fields(config: Mapping[str, Any], fixed: Mapping[str, Any], component: str) -> None:
    for field, expected in fixed.items():
        value = config.get(field, expected)
        if value != expected:
            raise CheckpointExportError(
                f"The {component} config has {field}={value!r}, but the original single-file layout "
                f"only supports {field}={expected!r}. Save this model as a diffusers folder instead."
            )


def _has_cross_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


def _check_unet_config(config: Mapping[str, Any]) -> None:
    _check_fixed_fields(config, _UNET_FIXED_FIELDS, "UNet")
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    allowed_down = {"DownBlock2D", "CrossAttnDownBlock2D"}
    allowed_up = {"UpBlock2D", "CrossAttnUpBlock2D"}
    if not set(down) <= allowed_down or not set(up) <= allowed_up:
        raise CheckpointExportError(
            f"The UNet uses blocks {down} / {up}; the original layout only has "
            f"{sorted(allowed_down)} and {sorted(allowed_up)}. Save it as a diffusers folder instead."
        )
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise CheckpointExportError(
            f"The UNet's up blocks {up} do not mirror its down blocks {down}; the original layout "
            "places attention by resolution, so both sides must match. Save it as a diffusers folder."
        )
    if config.get("class_embed_type") not in (None, "projection"):
        raise CheckpointExportError(
            f"UNet class_embed_type={config['class_embed_type']!r} has no original-layout equivalent."
        )
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise CheckpointExportError(
            f"UNet addition_embed_type={config['addition_embed_type']!r} has no original-layout equivalent."
        )
    if config.get("class_embed_type") and config.get("addition_embed_type"):
        raise CheckpointExportError(
            "The UNet has both a class embedding and an addition embedding; the original layout has "
            "room for one label embedding only."
        )


def _unet_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, _Rename]]:
    """diffusers module prefix -> (original module prefix, parameter rename), read off the config.

    Original ``input_blocks`` are a flat list: ``0`` is ``conv_in``, then per resolution level
    ``num_res_blocks`` entries of ``[ResBlock, (SpatialTransformer)]`` followed by one
    ``[Downsample]`` entry (except on the last level). ``output_blocks`` hold ``num_res_blocks + 1``
    entries per level, deepest level first, with the upsampler appended to the last entry of each
    level after the resnet and, where present, the transformer.
    """
    resnet = _rename_first(_UNET_RESNET_RENAMES)
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = _as_list(config["layers_per_block"], levels)

    module_map: dict[str, tuple[str, _Rename]] = {
        "time_embedding.linear_1": ("time_embed.0", _keep),
        "time_embedding.linear_2": ("time_embed.2", _keep),
        "conv_in": ("input_blocks.0.0", _keep),
        "conv_norm_out": ("out.0", _keep),
        "conv_out": ("out.2", _keep),
        "mid_block.resnets.0": ("middle_block.0", resnet),
        "mid_block.attentions.0": ("middle_block.1", _keep),
        "mid_block.resnets.1": ("middle_block.2", resnet),
    }
    if config.get("class_embed_type") == "projection":
        module_map["class_embedding.linear_1"] = ("label_emb.0.0", _keep)
        module_map["class_embedding.linear_2"] = ("label_emb.0.2", _keep)
    elif config.get("num_class_embeds") is not None:
        module_map["class_embedding"] = ("label_emb", _keep)
    if config.get("addition_embed_type") == "text_time":
        module_map["add_embedding.linear_1"] = ("label_emb.0.0", _keep)
        module_map["add_embedding.linear_2"] = ("label_emb.0.2", _keep)

    index = 1
    for level, block_type in enumerate(down_types):
        for layer in range(layers[level]):
            module_map[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", resnet)
            if _has_cross_attention(block_type):
                module_map[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", _keep)
            index += 1
        if level != levels - 1:
            module_map[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", _keep)
            index += 1

    index = 0
    for level, block_type in enumerate(up_types):
        layer_count = layers[levels - 1 - level] + 1
        for layer in range(layer_count):
            module_map[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", resnet)
            if _has_cross_attention(block_type):
                module_map[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", _keep)
            index += 1
        if level != levels - 1:
            slot = 2 if _has_cross_attention(block_type) else 1
            module_map[f"up_blocks.{level}.upsamplers.0.conv"] = (
                f"output_blocks.{index - 1}.{slot}.conv",
                _keep,
            )
    return module_map


def unet_to_ldm(
    unet_state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    *,
    prefix: str = UNET_PREFIX,
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict into the original UNetModel layout.

    Transformer internals (``proj_in``, ``transformer_blocks.N.attn1.to_q`` ...) already share
    their names with the original ``SpatialTransformer``, and ``proj_in``/``proj_out`` keep their
    conv (SD1) or linear (SD2/SDXL) shape, so only the block addresses and resnet names change.
    """
    _check_unet_config(unet_config)
    converted = _apply_module_map(unet_state_dict, _unet_module_map(unet_config), "UNet")
    return {prefix + key: tensor for key, tensor in converted.items()}


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


def _vae_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, _Rename]]:
    """The decoder's ``up`` list is indexed from the highest resolution, diffusers' from the lowest."""
    resnet = _rename_first(_VAE_RESNET_RENAMES)
    attention = _rename_first(_VAE_ATTENTION_RENAMES)
    levels = len(config["block_out_channels"])
    module_map: dict[str, tuple[str, _Rename]] = {
        "quant_conv": ("quant_conv", _keep),
        "post_quant_conv": ("post_quant_conv", _keep),
    }
    for part in ("encoder", "decoder"):
        module_map[f"{part}.conv_in"] = (f"{part}.conv_in", _keep)
        module_map[f"{part}.conv_out"] = (f"{part}.conv_out", _keep)
        module_map[f"{part}.conv_norm_out"] = (f"{part}.norm_out", _keep)
        module_map[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", resnet)
        module_map[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", resnet)
        module_map[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", attention)
    encoder_layers = int(config["layers_per_block"])
    for level in range(levels):
        for layer in range(encoder_layers):
            module_map[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}",
                resnet,
            )
        module_map[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
            f"encoder.down.{level}.downsample.conv",
            _keep,
        )
    for level in range(levels):
        original_level = levels - 1 - level
        for layer in range(encoder_layers + 1):
            module_map[f"decoder.up_blocks.{level}.resnets.{layer}"] = (
                f"decoder.up.{original_level}.block.{layer}",
                resnet,
            )
        module_map[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (
            f"decoder.up.{original_level}.upsample.conv",
            _keep,
        )
    return module_map


def vae_to_ldm(
    vae_state_dict: Mapping[str, torch.Tensor],
    vae_config: Mapping[str, Any],
    *,
    prefix: str = VAE_PREFIX,
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict into the original ``AutoencoderKL`` layout.

    The original mid-block attention computes q/k/v/out with 1x1 convolutions, so the linear
    weights gain two trailing singleton dimensions (``[out, in]`` -> ``[out, in, 1, 1]``).
    """
    _check_fixed_fields(vae_config, _VAE_FIXED_FIELDS, "VAE")
    converted = _apply_module_map(vae_state_dict, _vae_module_map(vae_config), "VAE")
    for key, tensor in converted.items():
        is_attention_projection = key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        if ".mid.attn_1." in key and is_attention_projection and tensor.ndim == 2:
            converted[key] = tensor.reshape(*tensor.shape, 1, 1)
    return {prefix + key: tensor for key, tensor in converted.items()}


# --------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------


def _text_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Address every CLIP text-tower weight relative to the text model.

    transformers >= 5.6 saves ``CLIPTextModel`` without the ``text_model.`` level while
    ``CLIPTextModelWithProjection`` keeps it; ``position_ids`` is a non-persistent buffer that
    current models neither save nor accept, so it is left out of the export too.
    """
    result: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        relative = key.removeprefix("text_model.")
        if relative.endswith("position_ids"):
            continue
        result[relative] = tensor
    return result


def clip_to_ldm(
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    *,
    prefix: str = SD1_TEXT_ENCODER_PREFIX,
) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text encoder (SD1, SDXL's first encoder) in the original layout.

    The original ``FrozenCLIPEmbedder`` wraps a transformers ``CLIPTextModel``, so its keys are the
    transformers names under ``<prefix>text_model.``; only the prefix changes.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in _text_model_keys(text_encoder_state_dict).items():
        if key.startswith("text_projection."):
            converted[prefix + key] = tensor
        else:
            converted[f"{prefix}text_model.{key}"] = tensor
    return converted


def open_clip_to_ldm(
    text_encoder_state_dict: Mapping[str, torch.Tensor],
    *,
    prefix: str = SD2_TEXT_ENCODER_PREFIX,
) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (SD2's encoder, SDXL's second encoder) in the OpenCLIP layout.

    OpenCLIP uses ``nn.MultiheadAttention``, whose q/k/v projections are one stacked
    ``in_proj_weight`` (``[3 * width, width]``) and ``in_proj_bias``; its ``text_projection`` is a
    bare ``[width, embed_dim]`` matrix used as ``x @ text_projection``, i.e. the transpose of a
    ``nn.Linear`` weight (diffusers' importer also reads the q/k/v split width from its first dim).

    Only the blocks the encoder has are written. SD2's diffusers encoder already ends at the
    penultimate of OpenCLIP's 24 blocks, so its export has no ``resblocks.23`` (the original code
    never runs that block with ``layer: penultimate``), exactly like diffusers' own conversions.
    """
    import torch

    weights = _text_model_keys(text_encoder_state_dict)
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, tensor in weights.items():
        if key == "embeddings.token_embedding.weight":
            converted[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            converted[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            converted[prefix + "ln_final." + key.removeprefix("final_layer_norm.")] = tensor
        elif key == "text_projection.weight":
            converted[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith("encoder.layers."):
            layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
            block = f"{prefix}transformer.resblocks.{layer}."
            projection = rest.removeprefix("self_attn.")
            if projection[:6] in ("q_proj", "k_proj", "v_proj"):
                kind = "in_proj_weight" if projection.endswith(".weight") else "in_proj_bias"
                qkv.setdefault(block + "attn." + kind, {})[projection[0]] = tensor
                continue
            renamed = _rename_first(_OPEN_CLIP_LAYER_RENAMES)(rest)
            if renamed == rest:
                unmapped.append(key)
            converted[block + renamed] = tensor
        else:
            unmapped.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unmapped.append(key)
            continue
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise CheckpointExportError(
            f"The text encoder has weights the OpenCLIP layout has no place for ({', '.join(unmapped[:5])}). "
            "Save this model as a diffusers folder instead."
        )
    return converted


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in MODEL_FAMILIES:
        raise CheckpointExportError(
            f"Unknown model family {family!r}; choose one of {', '.join(MODEL_FAMILIES)}."
        )


def _component(pipe: DiffusionPipeline, name: str, family: str) -> Any:
    component = getattr(pipe, name, None)
    if component is None:
        raise CheckpointExportError(
            f"The {family} pipeline has no {name}; a single-file {family} checkpoint needs one. "
            "Export a complete pipeline (refiners and text-encoder-free pipelines are not supported)."
        )
    return component


def pipeline_to_ldm_state_dict(pipe: DiffusionPipeline, family: str) -> dict[str, torch.Tensor]:
    """All weights of ``pipe`` under their original single-file names (tensors are not copied)."""
    _check_family(family)
    unet = _component(pipe, "unet", family)
    vae = _component(pipe, "vae", family)
    text_encoder = _component(pipe, "text_encoder", family)
    state_dict = unet_to_ldm(unet.state_dict(), unet.config)
    state_dict.update(vae_to_ldm(vae.state_dict(), vae.config))
    if family == "sd1":
        state_dict.update(clip_to_ldm(text_encoder.state_dict(), prefix=SD1_TEXT_ENCODER_PREFIX))
    elif family == "sd2":
        state_dict.update(open_clip_to_ldm(text_encoder.state_dict(), prefix=SD2_TEXT_ENCODER_PREFIX))
    else:
        text_encoder_2 = _component(pipe, "text_encoder_2", family)
        second = text_encoder_2.state_dict()
        if "text_projection.weight" not in second:
            raise CheckpointExportError(
                "SDXL's second text encoder must be a CLIPTextModelWithProjection: the pooled prompt "
                "embedding goes through its text_projection, which the checkpoint has to carry."
            )
        state_dict.update(clip_to_ldm(text_encoder.state_dict(), prefix=SDXL_TEXT_ENCODER_PREFIX))
        state_dict.update(open_clip_to_ldm(second, prefix=SDXL_TEXT_ENCODER_2_PREFIX))
    return state_dict


def _unet_head_params(config: Mapping[str, Any]) -> dict[str, int]:
    """Heads as the original yaml states them.

    diffusers' ``attention_head_dim`` is (for historical reasons) the number of heads. The
    original config gives either ``num_heads`` (SD1: same head count on every level) or
    ``num_head_channels`` (SD2/SDXL: same width per head, so deeper levels get more heads).
    diffusers' importer reads ``num_heads`` for conv-projection UNets and derives per-level heads
    from ``num_head_channels`` for linear-projection ones, so we write what it will read back.
    """
    channels = list(config["block_out_channels"])
    heads = _as_list(config["attention_head_dim"], len(channels))
    if not config.get("use_linear_projection", False):
        if len(set(heads)) != 1:
            raise CheckpointExportError(
                f"The UNet has attention_head_dim={heads} per level without linear projection; the "
                "original format can only state one head count for such a UNet."
            )
        return {"num_heads": heads[0]}
    widths = {c // h for c, h in zip(channels, heads, strict=True) if c % h == 0}
    if len(widths) != 1 or any(c % h for c, h in zip(channels, heads, strict=True)):
        raise CheckpointExportError(
            f"The UNet's heads per level {heads} do not give one head width for channels {channels}; "
            "the original format states a single num_head_channels."
        )
    width = widths.pop()
    if channels[0] % width:
        raise CheckpointExportError(f"The UNet's head width {width} does not divide {channels[0]} channels.")
    return {"num_head_channels": width}


def _unet_params(config: Mapping[str, Any]) -> dict[str, Any]:
    _check_unet_config(config)
    channels = list(config["block_out_channels"])
    model_channels = channels[0]
    if any(c % model_channels for c in channels):
        raise CheckpointExportError(
            f"UNet block_out_channels {channels} are not multiples of the first level's "
            f"{model_channels}; the original format states them as channel_mult."
        )
    context_dim = config["cross_attention_dim"]
    if not isinstance(context_dim, int):
        raise CheckpointExportError(
            f"UNet cross_attention_dim={context_dim!r} varies per block; the original format has one."
        )
    layers = config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    params: dict[str, Any] = {
        "use_checkpoint": True,
        "image_size": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "model_channels": model_channels,
        "attention_resolutions": [
            2**level for level, t in enumerate(config["down_block_types"]) if _has_cross_attention(t)
        ],
        "num_res_blocks": layers if isinstance(layers, int) else list(layers),
        "channel_mult": [c // model_channels for c in channels],
        **_unet_head_params(config),
        "use_spatial_transformer": True,
    }
    if config.get("use_linear_projection", False):
        params["use_linear_in_transformer"] = True
    params["transformer_depth"] = depth if isinstance(depth, int) else list(depth)
    params["context_dim"] = context_dim
    if config.get("class_embed_type") == "projection" or config.get("addition_embed_type") == "text_time":
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = config["projection_class_embeddings_input_dim"]
    elif config.get("num_class_embeds") is not None:
        params["num_classes"] = config["num_class_embeds"]
    params["legacy"] = False
    return params


def _vae_ddconfig(config: Mapping[str, Any], *, xformers_attention: bool) -> dict[str, Any]:
    _check_fixed_fields(config, _VAE_FIXED_FIELDS, "VAE")
    channels = list(config["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointExportError(
            f"VAE block_out_channels {channels} are not multiples of {base}; the original format "
            "states them as ch_mult."
        )
    ddconfig: dict[str, Any] = {}
    if xformers_attention:
        ddconfig["attn_type"] = "vanilla-xformers"
    ddconfig.update(
        {
            "double_z": True,
            "z_channels": config["latent_channels"],
            "resolution": config["sample_size"],
            "in_channels": config["in_channels"],
            "out_ch": config["out_channels"],
            "ch": base,
            "ch_mult": [c // base for c in channels],
            "num_res_blocks": config["layers_per_block"],
            "attn_resolutions": [],
            "dropout": 0.0,
        }
    )
    return ddconfig


def _first_stage_config(vae_config: Mapping[str, Any], target: str, *, xformers: bool) -> dict[str, Any]:
    return {
        "target": target,
        "params": {
            "embed_dim": vae_config["latent_channels"],
            "monitor": "val/rec_loss",
            "ddconfig": _vae_ddconfig(vae_config, xformers_attention=xformers),
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def _is_inpainting(unet_config: Mapping[str, Any]) -> bool:
    """Inpainting UNets take 4 latent + 4 masked-image latent + 1 mask channels."""
    return int(unet_config["in_channels"]) == int(unet_config["out_channels"]) * 2 + 1


def _ldm_config(pipe: DiffusionPipeline, family: str) -> dict[str, Any]:
    unet_config = pipe.unet.config
    scheduler_config = pipe.scheduler.config
    inpainting = _is_inpainting(unet_config)
    params: dict[str, Any] = {}
    if scheduler_config.get("prediction_type", "epsilon") == "v_prediction":
        params["parameterization"] = "v"
    params.update(
        {
            "linear_start": scheduler_config.get("beta_start", 0.00085),
            "linear_end": scheduler_config.get("beta_end", 0.012),
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": scheduler_config.get("num_train_timesteps", 1000),
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": unet_config["sample_size"],
            "channels": unet_config["out_channels"],
            "cond_stage_trainable": False,
            "conditioning_key": "hybrid" if inpainting else "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": pipe.vae.config["scaling_factor"],
            "use_ema": False,
        }
    )
    if inpainting:
        params["finetune_keys"] = None
    params["unet_config"] = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": _unet_params(unet_config),
    }
    params["first_stage_config"] = _first_stage_config(
        pipe.vae.config, "ldm.models.autoencoder.AutoencoderKL", xformers=False
    )
    if family == "sd1":
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        params["cond_stage_config"] = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
    target = "LatentInpaintDiffusion" if inpainting else "LatentDiffusion"
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": f"ldm.models.diffusion.ddpm.{target}",
            "params": params,
        }
    }


def _sgm_config(pipe: DiffusionPipeline) -> dict[str, Any]:
    unet_config = pipe.unet.config
    scheduler_config = pipe.scheduler.config
    v_prediction = scheduler_config.get("prediction_type", "epsilon") == "v_prediction"
    parameterization = "V" if v_prediction else "Eps"
    modules = "sgm.modules.diffusionmodules"
    network_params = _unet_params(unet_config)
    network_params["spatial_transformer_attn_type"] = "softmax-xformers"
    network_params["legacy"] = network_params.pop("legacy")
    time_embed_dim = unet_config.get("addition_time_embed_dim") or 256
    # SDXL's UNet reads the penultimate hidden state of the first encoder: hidden_states[-2],
    # which transformers indexes as num_hidden_layers - 1 (index 0 is the embedding output).
    first_encoder_layers = int(pipe.text_encoder.config.num_hidden_layers)

    def size_embedder(input_key: str) -> dict[str, Any]:
        return {
            "is_trainable": False,
            "input_key": input_key,
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": time_embed_dim},
        }

    return {
        "model": {
            "target": "sgm.models.diffusion.DiffusionEngine",
            "params": {
                "scale_factor": pipe.vae.config["scaling_factor"],
                "disable_first_stage_autocast": True,
                "denoiser_config": {
                    "target": f"{modules}.denoiser.DiscreteDenoiser",
                    "params": {
                        "num_idx": scheduler_config.get("num_train_timesteps", 1000),
                        "weighting_config": {
                            "target": f"{modules}.denoiser_weighting.{parameterization}Weighting"
                        },
                        "scaling_config": {"target": f"{modules}.denoiser_scaling.{parameterization}Scaling"},
                        "discretization_config": {
                            "target": f"{modules}.discretizer.LegacyDDPMDiscretization",
                            "params": {
                                "linear_start": scheduler_config.get("beta_start", 0.00085),
                                "linear_end": scheduler_config.get("beta_end", 0.012),
                                "num_timesteps": scheduler_config.get("num_train_timesteps", 1000),
                            },
                        },
                    },
                },
                "network_config": {
                    "target": f"{modules}.openaimodel.UNetModel",
                    "params": network_params,
                },
                "conditioner_config": {
                    "target": "sgm.modules.GeneralConditioner",
                    "params": {
                        "emb_models": [
                            {
                                "is_trainable": False,
                                "input_key": "txt",
                                "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                                "params": {"layer": "hidden", "layer_idx": first_encoder_layers - 1},
                            },
                            {
                                "is_trainable": False,
                                "input_key": "txt",
                                "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                                "params": {
                                    "arch": "ViT-bigG-14",
                                    "version": "laion2b_s39b_b160k",
                                    "freeze": True,
                                    "layer": "penultimate",
                                    "always_return_pooled": True,
                                    "legacy": False,
                                },
                            },
                            size_embedder("original_size_as_tuple"),
                            size_embedder("crop_coords_top_left"),
                            size_embedder("target_size_as_tuple"),
                        ]
                    },
                },
                "first_stage_config": _first_stage_config(
                    pipe.vae.config, "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", xformers=True
                ),
            },
        }
    }


def ldm_config_for(pipe: DiffusionPipeline, family: str) -> dict[str, Any]:
    """The original inference yaml (as a dict) that describes ``pipe``'s architecture.

    SD1/SD2 follow the layout of ``v1-inference.yaml`` / ``v2-inference-v.yaml`` (and their
    ``-inpainting`` variants when the UNet takes 9 input channels); SDXL follows SGM's
    ``sd_xl_base.yaml``. Sizes come from the component configs, so a tiny test model gets a
    yaml that describes the tiny model. Text-encoder sizes have no place in these formats: the
    original code names its encoders by architecture (``FrozenCLIPEmbedder`` = CLIP ViT-L/14,
    ``ViT-bigG-14``), so those entries say which kind of encoder the checkpoint carries.
    """
    _check_family(family)
    for name in ("unet", "vae", "scheduler", "text_encoder"):
        _component(pipe, name, family)
    if family == "sdxl":
        return _sgm_config(pipe)
    return _ldm_config(pipe, family)


def _text_encoder_metadata(pipe: DiffusionPipeline) -> dict[str, str]:
    """Record the text encoders' configs in the file header.

    The LDM layout has no field for them and the attention-head count cannot be read off the
    weight shapes, so without this a non-standard encoder would reload with a different head
    count. Standard SD checkpoints do not need it (the loader uses the shipped configs).
    """
    import json

    metadata = {}
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
            metadata[f"{name}_config"] = json.dumps(config, default=str)
    return metadata


def save_single_file_checkpoint(
    pipe: DiffusionPipeline,
    family: str,
    path: str | Path,
    *,
    sidecar_yaml: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``pipe`` as ``<path>.safetensors`` (plus ``<path>.yaml``) and return the weights path.

    ``path`` may name the ``.safetensors`` file or its stem. The yaml sits next to the weights under
    the same stem, which is where A1111 and diffusers look for a checkpoint's own config.
    ``dtype`` (e.g. ``torch.float16``) converts floating-point weights on the way out.
    """
    from safetensors.torch import save_file

    _check_family(family)
    target = Path(path)
    if target.suffix != ".safetensors":
        target = target.with_name(target.name + ".safetensors")
    state_dict = pipeline_to_ldm_state_dict(pipe, family)
    tensors = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.detach().contiguous()
    config = ldm_config_for(pipe, family)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"format": "pt", **_text_encoder_metadata(pipe)})
    if sidecar_yaml:
        import yaml

        yaml_path = target.with_suffix(".yaml")
        yaml_path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    return target
