"""Tiny random-weight Stable Diffusion pipelines for tests, and writers for the on-disk formats.

Sizes follow diffusers' own pipeline fast tests (two UNet levels of 32/64 channels, a two-level
VAE, 32-wide five-layer CLIP text towers) so a 2-step 32x32 generation takes well under a second
on CPU. Two things differ from those tests on purpose:

* the text encoders keep CLIP's real vocabulary (49,408 tokens) and 77 positions, because the
  tokenizers are the real CLIP BPE ones from :func:`pipelines.prompts.tokenizer.build_clip_tokenizer`;
* group norms use 32 groups, the value the original LDM/SGM code hard-codes, so the models can be
  exported as original single-file checkpoints (see :mod:`pipelines.models.checkpoint_export`).

Each model is built from its own fixed seed inside a forked RNG, so two calls give identical
weights and the caller's global torch RNG is left untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

TINY_FAMILIES = ("sd1", "sd2", "sdxl")

# stable-diffusion-v1-5/scheduler/scheduler_config.json
SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
}

_CLIP_BOS = 49406
_CLIP_EOS = 49407
# SDXL's add_time_ids embedding width (SGM's ConcatTimestepEmbedderND outdim); kept at the real
# value because diffusers' single-file importer assumes it for SDXL UNets.
_SDXL_TIME_EMBED_DIM = 256
_SDXL_TIME_IDS = 6  # original size (2) + crop top-left (2) + target size (2)


def _unet(family: str, in_channels: int) -> Any:
    from diffusers import UNet2DConditionModel

    common: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=32)
    if family == "sd2":
        return UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True
        )
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=64,  # both encoders' hidden states concatenated: 32 + 32
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=32 + _SDXL_TIME_IDS * _SDXL_TIME_EMBED_DIM,
    )


def _vae(family: str) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def _text_encoder_config(*, open_clip: bool, pad_token_id: int) -> Any:
    """OpenAI CLIP uses quick_gelu; OpenCLIP (SD2, SDXL's second encoder) exact gelu."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=_CLIP_BOS,
        eos_token_id=_CLIP_EOS,
        pad_token_id=pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="gelu" if open_clip else "quick_gelu",
        projection_dim=32,
    )


def _scheduler(family: str, *, inpainting: bool) -> Any:
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    if family == "sdxl":
        return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    # SD2's 768 models predict v; its inpainting model (like SD1's) predicts noise.
    prediction_type = "v_prediction" if family == "sd2" and not inpainting else "epsilon"
    return PNDMScheduler.from_config({**SD1_SCHEDULER_CONFIG, "prediction_type": prediction_type})


def tiny_pipeline(family: str, *, inpainting: bool = False, seed: int = 0) -> DiffusionPipeline:
    """A random-weight ``sd1``/``sd2``/``sdxl`` pipeline (inpainting variant: 9-channel UNet)."""
    import torch
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.prompts.tokenizer import build_clip_tokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}.")
    in_channels = 9 if inpainting else 4

    def seeded(build: Any, *args: Any) -> Any:
        # Seed each model on its own so adding or resizing one never shifts another's weights.
        torch.manual_seed(seed)
        return build(*args)

    with torch.random.fork_rng(devices=[]):
        unet = seeded(_unet, family, in_channels)
        vae = seeded(_vae, family)
        if family == "sdxl":
            text_encoder = seeded(
                CLIPTextModel, _text_encoder_config(open_clip=False, pad_token_id=_CLIP_EOS)
            )
            text_encoder_2 = seeded(
                CLIPTextModelWithProjection, _text_encoder_config(open_clip=True, pad_token_id=0)
            )
        else:
            open_clip = family == "sd2"
            text_encoder = seeded(
                CLIPTextModel,
                _text_encoder_config(open_clip=open_clip, pad_token_id=0 if open_clip else _CLIP_EOS),
            )
    scheduler = _scheduler(family, inpainting=inpainting)

    if family == "sdxl":
        sdxl_class = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        pipe = sdxl_class(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=build_clip_tokenizer(),
            tokenizer_2=build_clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            feature_extractor=None,
            add_watermarker=False,
        )
    else:
        sd_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        pipe = sd_class(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=build_clip_tokenizer(pad_token="!" if family == "sd2" else "<|endoftext|>"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_folder(pipe: DiffusionPipeline, path: str | Path) -> Path:
    """``save_pretrained`` with safetensors weights; returns the folder."""
    folder = Path(path)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_single_file(pipe: DiffusionPipeline, path: Path, family: str, *, sidecar_yaml: bool = True) -> Path:
    """Write an A1111-style ``<name>.safetensors`` (+ ``<name>.yaml``); returns the weights path."""
    from pipelines.models.checkpoint_export import save_single_file_checkpoint

    return save_single_file_checkpoint(pipe, family, path, sidecar_yaml=sidecar_yaml)
