"""The shipped per-family diffusers configs describe the real models (meta device, no weights, no network).

Three independent checks per family: (1) models built from the JSON configs have the published
parameter counts, which the text encoders' are also re-derived from CLIP's layer arithmetic;
(2) diffusers' own LDM -> diffusers converters, fed our ``original.yaml`` and a fake checkpoint
holding only the tensors they inspect, give the same architecture as our ``unet``/``vae`` JSON;
(3) the cross-component numbers agree (text width = UNet cross-attention width, etc.).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from pipelines.models.family_configs import (
    CONFIGS_ROOT,
    FAMILIES,
    MissingFamilyConfigError,
    UnknownModelFamilyError,
    family_components,
    family_config_dir,
    load_component_config,
    load_original_config,
    scheduler_config,
    tokenizer_pad_token,
)
from pipelines.prompts.tokenizer import MODEL_MAX_LENGTH

# Published parameter counts (SD1.5 / SD2.x / SDXL model cards and diffusers conversions). Inpainting
# UNets add 5 input channels to conv_in: 320 * 5 * 3 * 3 = 14,400 weights.
SD1_UNET = 859_520_964
SD2_UNET = 865_910_724
SDXL_UNET = 2_567_463_684
INPAINT_CONV_IN_EXTRA = 320 * 5 * 3 * 3
SDXL_REFINER_UNET = 2_259_526_660
VAE = 83_653_863
CLIP_L = 123_060_480  # OpenAI CLIP ViT-L/14 text tower, 12 layers
OPENCLIP_H_23 = 340_387_840  # OpenCLIP ViT-H/14 text tower, penultimate layer: 23 of 24 layers kept
OPENCLIP_BIGG_PROJ = 694_659_840  # OpenCLIP ViT-bigG/14 text tower, 32 layers, with text projection

EXPECTED: dict[str, dict[str, Any]] = {
    "sd1": {
        "unet_params": SD1_UNET,
        "text_encoders": {"text_encoder": CLIP_L},
        "in_channels": 4,
        "prediction_type": "epsilon",
        "cross_attention_dim": 768,
        "use_linear_projection": False,
        "addition_embed_type": None,
        "sample_size": 64,
        "pipeline": "StableDiffusionPipeline",
        "pad_tokens": {"tokenizer": "<|endoftext|>"},
        "diffusers_model_type": "v1",
    },
    "sd1-inpaint": {
        "unet_params": SD1_UNET + INPAINT_CONV_IN_EXTRA,
        "text_encoders": {"text_encoder": CLIP_L},
        "in_channels": 9,
        "prediction_type": "epsilon",
        "cross_attention_dim": 768,
        "use_linear_projection": False,
        "addition_embed_type": None,
        "sample_size": 64,
        "pipeline": "StableDiffusionInpaintPipeline",
        "pad_tokens": {"tokenizer": "<|endoftext|>"},
        "diffusers_model_type": "inpainting",
    },
    "sd2": {
        "unet_params": SD2_UNET,
        "text_encoders": {"text_encoder": OPENCLIP_H_23},
        "in_channels": 4,
        "prediction_type": "v_prediction",
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "addition_embed_type": None,
        "sample_size": 96,
        "pipeline": "StableDiffusionPipeline",
        "pad_tokens": {"tokenizer": "!"},
        "diffusers_model_type": "v2",
    },
    "sd2-base": {
        "unet_params": SD2_UNET,
        "text_encoders": {"text_encoder": OPENCLIP_H_23},
        "in_channels": 4,
        "prediction_type": "epsilon",
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "addition_embed_type": None,
        "sample_size": 64,
        "pipeline": "StableDiffusionPipeline",
        "pad_tokens": {"tokenizer": "!"},
        "diffusers_model_type": "v2",
    },
    "sd2-inpaint": {
        "unet_params": SD2_UNET + INPAINT_CONV_IN_EXTRA,
        "text_encoders": {"text_encoder": OPENCLIP_H_23},
        "in_channels": 9,
        "prediction_type": "epsilon",
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "addition_embed_type": None,
        "sample_size": 64,
        "pipeline": "StableDiffusionInpaintPipeline",
        "pad_tokens": {"tokenizer": "!"},
        "diffusers_model_type": "inpainting_v2",
    },
    "sdxl": {
        "unet_params": SDXL_UNET,
        "text_encoders": {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG_PROJ},
        "in_channels": 4,
        "prediction_type": "epsilon",
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "sample_size": 128,
        "pipeline": "StableDiffusionXLPipeline",
        "pad_tokens": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "diffusers_model_type": "xl_base",
    },
    "sdxl-inpaint": {
        "unet_params": SDXL_UNET + INPAINT_CONV_IN_EXTRA,
        "text_encoders": {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG_PROJ},
        "in_channels": 9,
        "prediction_type": "epsilon",
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "sample_size": 128,
        "pipeline": "StableDiffusionXLInpaintPipeline",
        "pad_tokens": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "diffusers_model_type": "xl_inpaint",
    },
    "sdxl-refiner": {
        "unet_params": SDXL_REFINER_UNET,
        "text_encoders": {"text_encoder_2": OPENCLIP_BIGG_PROJ},
        "in_channels": 4,
        "prediction_type": "epsilon",
        "cross_attention_dim": 1280,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "sample_size": 128,
        "pipeline": "StableDiffusionXLImg2ImgPipeline",
        "pad_tokens": {"tokenizer_2": "!"},
        "diffusers_model_type": "xl_refiner",
    },
}

# The official hub repo whose configs each folder reproduces.
HUB_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd1-inpaint": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sd2-base": "stabilityai/stable-diffusion-2-1-base",
    "sd2-inpaint": "stabilityai/stable-diffusion-2-inpainting",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-inpaint": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
}

# The tensors of a real single-file checkpoint that diffusers' model-type detection looks at,
# with their true shapes (everything else of the checkpoint is irrelevant to these converters).
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# SD1/SD2 first cross-attention key projection: (320, text width); SDXL has no attention at that level.
_FIRST_ATTN2_TO_K = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_XL_BASE_OPENCLIP = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_XL_REFINER_OPENCLIP = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
FAKE_CHECKPOINT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "sd1": {_UNET_CONV_IN: (320, 4, 3, 3), _FIRST_ATTN2_TO_K: (320, 768)},
    "sd1-inpaint": {_UNET_CONV_IN: (320, 9, 3, 3), _FIRST_ATTN2_TO_K: (320, 768)},
    "sd2": {_UNET_CONV_IN: (320, 4, 3, 3), _FIRST_ATTN2_TO_K: (320, 1024)},
    "sd2-base": {_UNET_CONV_IN: (320, 4, 3, 3), _FIRST_ATTN2_TO_K: (320, 1024)},
    "sd2-inpaint": {_UNET_CONV_IN: (320, 9, 3, 3), _FIRST_ATTN2_TO_K: (320, 1024)},
    "sdxl": {_UNET_CONV_IN: (320, 4, 3, 3), _XL_BASE_OPENCLIP: (1280,)},
    "sdxl-inpaint": {_UNET_CONV_IN: (320, 9, 3, 3), _XL_BASE_OPENCLIP: (1280,)},
    "sdxl-refiner": {_UNET_CONV_IN: (384, 4, 3, 3), _XL_REFINER_OPENCLIP: (1280,)},
}

# diffusers guesses the UNet sample size from the checkpoint type; for SD2 it assumes the 768 model.
DIFFUSERS_SAMPLE_SIZE_GUESS = {"sd2-base": 96}


def _fake_checkpoint(family: str) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in FAKE_CHECKPOINT_SHAPES[family].items()}


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _plain(value: Any) -> Any:
    """Configs store sequences as lists in JSON but as tuples once registered; compare them alike."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def _clip_text_params(config: dict[str, Any], with_projection: bool) -> int:
    """CLIP text-tower parameters from its shape: embeddings, pre-LN blocks, final LN, projection."""
    hidden = config["hidden_size"]
    inner = config["intermediate_size"]
    embeddings = (config["vocab_size"] + config["max_position_embeddings"]) * hidden
    attention = 4 * (hidden * hidden + hidden)  # q, k, v, out projections with biases
    mlp = hidden * inner + inner + inner * hidden + hidden
    layer_norms = 2 * 2 * hidden
    per_layer = attention + mlp + layer_norms
    projection = hidden * config["projection_dim"] if with_projection else 0
    return embeddings + config["num_hidden_layers"] * per_layer + 2 * hidden + projection


def _build_unet(family: str) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(load_component_config(family, "unet"))


def _build_vae(family: str) -> Any:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(load_component_config(family, "vae"))


# ------------------------------------------------------------------------------------------
# the reader module
# ------------------------------------------------------------------------------------------
def test_families_match_the_shipped_folders() -> None:
    # Every model-family folder (one with a model_index.json) is a known family, and vice versa;
    # other folders (e.g. sadtalker/ data) are not families.
    # The SD x4 upscaler's configs are not a checkpoint family (see pipelines/postprocess/sd_upscaler.py).
    from pipelines.postprocess.sd_upscaler import SD_UPSCALER_CONFIG_DIR

    shipped = {path.name for path in CONFIGS_ROOT.iterdir() if (path / "model_index.json").is_file()}
    assert shipped == {*FAMILIES, SD_UPSCALER_CONFIG_DIR.name}
    assert set(EXPECTED) == set(FAMILIES)
    for family in FAMILIES:
        assert family_config_dir(family) == CONFIGS_ROOT / family
        assert family_config_dir(family).is_dir()


def test_unknown_family_error_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelFamilyError) as caught:
        family_config_dir("sd3")
    message = str(caught.value)
    assert "'sd3'" in message
    for family in FAMILIES:
        assert family in message
    with pytest.raises(UnknownModelFamilyError):
        load_component_config("flux", "unet")


def test_missing_component_error_names_what_is_shipped() -> None:
    with pytest.raises(MissingFamilyConfigError) as caught:
        load_component_config("sdxl-refiner", "text_encoder")
    message = str(caught.value)
    assert "sdxl-refiner" in message
    assert "text_encoder_2" in message


def test_readers_return_fresh_dicts() -> None:
    first = scheduler_config("sd1")
    first["prediction_type"] = "changed"
    assert scheduler_config("sd1").get("prediction_type", "epsilon") == "epsilon"
    assert load_component_config("sd1", "scheduler") == scheduler_config("sd1")


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_is_a_config_only_diffusers_repo(family: str) -> None:
    directory = family_config_dir(family)
    model_index = load_component_config(family, "model_index")
    assert model_index["_class_name"] == EXPECTED[family]["pipeline"]
    # Every component the pipeline loads from weights or vocab files has its config here; the
    # safety checker and feature extractor are not used by SD Studio and are not shipped.
    wanted = {
        name
        for name, value in model_index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and name not in ("safety_checker", "feature_extractor")
    }
    assert set(family_components(family)) == wanted
    for component in wanted:
        assert load_component_config(family, component)
    for tokenizer in (name for name in wanted if name.startswith("tokenizer")):
        assert (directory / tokenizer / "special_tokens_map.json").is_file()
        assert load_component_config(family, tokenizer)["model_max_length"] == MODEL_MAX_LENGTH
        assert not list((directory / tokenizer).glob("vocab*")), "the vocabulary is built offline"
    assert (directory / "original.yaml").is_file()
    # No machine paths or hub ids of the converter's own disk.
    for path in directory.rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert not {"_name_or_path", "name_or_path", "special_tokens_map_file"} & set(data), path


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_pad_tokens(family: str) -> None:
    for tokenizer, pad_token in EXPECTED[family]["pad_tokens"].items():
        assert tokenizer_pad_token(family, tokenizer) == pad_token


# ------------------------------------------------------------------------------------------
# parameter counts (meta device: no memory is allocated)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_unet_parameter_count(family: str) -> None:
    unet = _build_unet(family)
    assert next(unet.parameters()).device.type == "meta"
    assert _count(unet) == EXPECTED[family]["unet_params"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_parameter_count(family: str) -> None:
    assert _count(_build_vae(family)) == VAE


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_parameter_counts(family: str) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    model_index = load_component_config(family, "model_index")
    for component, expected in EXPECTED[family]["text_encoders"].items():
        config = load_component_config(family, component)
        class_name = model_index[component][1]
        assert config["architectures"] == [class_name]
        with torch.device("meta"):
            model = classes[class_name](CLIPTextConfig(**config))
        with_projection = class_name == "CLIPTextModelWithProjection"
        assert _count(model) == expected
        assert _clip_text_params(config, with_projection) == expected


# ------------------------------------------------------------------------------------------
# distinguishing fields and cross-component consistency
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_distinguishing_fields(family: str) -> None:
    expected = EXPECTED[family]
    unet = _build_unet(family).config
    assert unet.in_channels == expected["in_channels"]
    assert unet.out_channels == 4
    assert unet.cross_attention_dim == expected["cross_attention_dim"]
    assert unet.use_linear_projection is expected["use_linear_projection"]
    assert unet.addition_embed_type == expected["addition_embed_type"]
    assert unet.sample_size == expected["sample_size"]
    assert scheduler_config(family).get("prediction_type", "epsilon") == expected["prediction_type"]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_width_feeds_the_unet(family: str) -> None:
    unet = load_component_config(family, "unet")
    encoders = [load_component_config(family, name) for name in EXPECTED[family]["text_encoders"]]
    # SDXL concatenates both encoders' penultimate hidden states for cross-attention.
    assert sum(encoder["hidden_size"] for encoder in encoders) == unet["cross_attention_dim"]
    if unet.get("addition_embed_type") == "text_time":
        # Pooled bigG text embedding + 256-wide Fourier features of each micro-conditioning number:
        # base 6 (original size, crop, target size), refiner 5 (original size, crop, aesthetic score).
        pooled = load_component_config(family, "text_encoder_2")["projection_dim"]
        conditioning_numbers = 5 if family == "sdxl-refiner" else 6
        assert unet["addition_time_embed_dim"] == 256
        assert unet["projection_class_embeddings_input_dim"] == pooled + conditioning_numbers * 256


@pytest.mark.parametrize("family", FAMILIES)
def test_scheduler_matches_the_original_config(family: str) -> None:
    import diffusers

    config = scheduler_config(family)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    assert scheduler.config.prediction_type == EXPECTED[family]["prediction_type"]
    assert scheduler.config.beta_schedule == "scaled_linear"
    params = load_original_config(family)["model"]["params"]
    if "linear_start" in params:  # LDM configs (SD1/SD2) spell the schedule out
        assert scheduler.config.beta_start == pytest.approx(params["linear_start"])
        assert scheduler.config.beta_end == pytest.approx(params["linear_end"])
        assert scheduler.config.num_train_timesteps == params["timesteps"]
        v_prediction = params.get("parameterization") == "v"
    else:  # SGM configs (SDXL) name the denoiser's scaling instead
        scaling = params["denoiser_config"]["params"]["scaling_config"]["target"]
        v_prediction = scaling.endswith("VScaling")
        assert params["denoiser_config"]["params"]["num_idx"] == scheduler.config.num_train_timesteps
    assert v_prediction is (EXPECTED[family]["prediction_type"] == "v_prediction")


# ------------------------------------------------------------------------------------------
# diffusers' LDM -> diffusers conversion of original.yaml agrees with the shipped JSON
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fake_checkpoint_is_recognised_as_the_family(family: str) -> None:
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_DEFAULT_PIPELINE_PATHS,
        infer_diffusers_model_type,
    )

    model_type = infer_diffusers_model_type(_fake_checkpoint(family))
    assert model_type == EXPECTED[family]["diffusers_model_type"]
    default_repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    if family != "sd2-base":  # diffusers maps every SD2 text-to-image checkpoint to 2-1 768
        assert default_repo == HUB_REPOS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_config_matches_original_yaml(family: str) -> None:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    derived = create_unet_diffusers_config_from_ldm(load_original_config(family), _fake_checkpoint(family))
    shipped = _build_unet(family).config  # the JSON plus UNet2DConditionModel's defaults
    assert derived["sample_size"] == DIFFUSERS_SAMPLE_SIZE_GUESS.get(family, shipped.sample_size)
    architecture = {key: value for key, value in derived.items() if key != "sample_size"}
    assert {
        "in_channels",
        "cross_attention_dim",
        "attention_head_dim",
        "down_block_types",
    } <= architecture.keys()
    for key, value in architecture.items():
        assert _plain(shipped[key]) == _plain(value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_config_matches_original_yaml(family: str) -> None:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    derived = create_vae_diffusers_config_from_ldm(load_original_config(family), _fake_checkpoint(family))
    shipped = _build_vae(family).config
    # sample_size only sets the tiling size, and the hub repos disagree with their own
    # training resolution there (SD1.5-inpainting says 256, SD2.1-base 768); it is not architecture.
    architecture = {key: value for key, value in derived.items() if key != "sample_size"}
    assert "scaling_factor" in architecture
    for key, value in architecture.items():
        assert _plain(shipped[key]) == _plain(value), key


def test_original_configs_parse_and_describe_the_unet() -> None:
    for family in FAMILIES:
        model = load_original_config(family)["model"]
        params = model["params"]
        unet = params.get("unet_config") or params["network_config"]
        assert unet["params"]["in_channels"] == EXPECTED[family]["in_channels"]
        assert params["first_stage_config"]["params"]["ddconfig"]["z_channels"] == 4
