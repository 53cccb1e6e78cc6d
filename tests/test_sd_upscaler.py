"""The Stable Diffusion x4 upscaler as an upscaler: listing, the engine's extras and hires paths,
tiling, determinism, single-file loading and the errors for damaged or half-copied weights.

The model is a tiny random-weight ``StableDiffusionUpscalePipeline`` with the real model's shape
rules (7-channel UNet with a 1000-entry noise-level embedding and cross-attention-only transformers
on one level, a three-level VAE that upsamples 4x, an OpenCLIP-style text tower with the real CLIP
tokenizer, the hub's two schedulers), so 32x32 -> 128x128 takes a fraction of a second on CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from contract.images import ExtrasRequest, Txt2ImgRequest
from pipelines.errors import StudioError
from pipelines.outputs.saving import read_png_parameters
from pipelines.postprocess.sd_upscaler import (
    SD_UPSCALER_CONFIG_DIR,
    SdUpscalerCache,
    SdUpscalerLoadError,
    SdUpscaleSettings,
    SdX4Upscaler,
    load_sd_upscaler,
    upscale_x4,
)
from pipelines.postprocess.upscalers import UpscaleRequestError, find_upscaler, upscaler_catalogue

TINY = "SD x4 (tiny-x4)"


def tiny_x4_pipeline(seed: int = 0) -> Any:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.models.family_configs import _read_json
    from pipelines.prompts.tokenizer import build_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=7,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            use_linear_projection=True,
            num_class_embeds=1000,
            only_cross_attention=[False, True],
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 32, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            latent_channels=4,
            layers_per_block=1,
            scaling_factor=0.08333,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                vocab_size=49408,
                max_position_embeddings=77,
                hidden_act="gelu",
                pad_token_id=0,
            )
        )
    schedulers = SD_UPSCALER_CONFIG_DIR
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(
            _read_json(schedulers / "low_res_scheduler" / "scheduler_config.json")
        ),
        scheduler=DDIMScheduler.from_config(_read_json(schedulers / "scheduler" / "scheduler_config.json")),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_single_file(pipe: Any, path: Path) -> Path:
    """The pipeline in the original LDM layout, the way x4-upscaler-ema.safetensors is stored."""
    from safetensors.torch import save_file

    from pipelines.models.checkpoint_export import open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    # The exporter refuses per-level only_cross_attention for checkpoints it writes; the key names
    # do not depend on it (attn1 is cross-attention in both layouts), so rename with it off.
    unet_config = {**pipe.unet.config, "only_cross_attention": False}
    state = unet_to_ldm(pipe.unet.state_dict(), unet_config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    state.update(open_clip_to_ldm(pipe.text_encoder.state_dict()))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


def _image(path: Path, size: tuple[int, int], seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def x4_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/`` with a tiny x4 upscaler folder, damaged copies of it, and a tiny SD1 checkpoint."""
    from tests.tiny_models import save_diffusers_folder, tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    upscalers = root / "SD-Upscaler"
    good = upscalers / "tiny-x4"
    tiny_x4_pipeline().save_pretrained(good, safe_serialization=True)
    broken = upscalers / "broken-weights"
    shutil.copytree(good, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    half = upscalers / "half-copied"
    shutil.copytree(good / "unet", half / "unet")
    missing = upscalers / "no-low-res-scheduler"
    shutil.copytree(good, missing)
    shutil.rmtree(missing / "low_res_scheduler")
    (missing / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    save_diffusers_folder(tiny_pipeline("sd1", seed=0), root / "Stable-diffusion" / "tiny-sd1")
    return root


@pytest.fixture(scope="module")
def engine(x4_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from app.services import StudioServices
    from app.settings import StudioSettings

    work = tmp_path_factory.mktemp("studio")
    settings = StudioSettings(
        models_dir=x4_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        default_checkpoint="tiny-sd1",
    )
    return StudioServices.create(settings).engine


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return _image(tmp_path / "photo.png", (32, 32))


def test_each_model_is_listed_as_an_sd_x4_upscaler(x4_root: Path) -> None:
    catalogue = {entry["name"]: entry for entry in upscaler_catalogue(x4_root)}
    entry = catalogue[TINY]
    assert entry["model_name"] == "SD-Upscaler"
    assert entry["scale"] == 4.0
    assert entry["model_path"] == str(x4_root / "SD-Upscaler" / "tiny-x4")
    # Half-copied folders stay listed so that choosing one explains what is missing.
    assert "SD x4 (half-copied)" in catalogue
    assert find_upscaler(x4_root, "tiny-x4").name == TINY  # the folder name also resolves


def test_extras_upscales_32_to_128_deterministically(engine: Any, photo: Path) -> None:
    request = ExtrasRequest(image=str(photo), upscaler_1=TINY, upscaling_resize=4, sd_upscale_steps=2)
    first = engine.run(request).images[0]
    assert first.image.size == (128, 128)
    assert first.path.is_file()
    text = read_png_parameters(first.path)
    assert f"Postprocess upscaler: {TINY}" in text
    assert "SD upscale noise level: 20" in text and "SD upscale seed: 0" in text
    again = engine.run(request).images[0]
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    other_seed = engine.run(request.model_copy(update={"sd_upscale_seed": 7})).images[0]
    assert not np.array_equal(np.asarray(first.image), np.asarray(other_seed.image))
    assert len(engine.sd_upscaler_cache) == 1


def test_extras_upscale_to_a_size_with_a_prompt(engine: Any, photo: Path) -> None:
    request = ExtrasRequest(
        image=str(photo),
        resize_mode=1,
        upscaling_resize_w=100,
        upscaling_resize_h=64,
        upscaler_1=TINY,
        sd_upscale_prompt="a brick wall, sharp",
        sd_upscale_steps=2,
        sd_upscale_seed=5,
    )
    saved = engine.run(request).images[0]
    assert saved.image.size == (100, 64)
    text = read_png_parameters(saved.path)
    assert 'SD upscale prompt: "a brick wall, sharp"' in text and "SD upscale CFG scale: 9," in text


def test_tiled_upscale_covers_the_whole_image(engine: Any, x4_root: Path) -> None:
    pipe = engine.sd_upscaler_cache.get(x4_root / "SD-Upscaler" / "tiny-x4")
    source = Image.open(_image(x4_root.parent / "wide.png", (48, 40), seed=2))
    calls: list[tuple[int, int]] = []
    settings = SdUpscaleSettings(steps=2, tile=32, tile_overlap=8)
    tiled = upscale_x4(pipe, source, settings, progress=lambda done, total: calls.append((done, total)))
    assert tiled.size == (192, 160)
    assert calls[-1] == (4, 4)  # 2 x 2 overlapping 32-pixel tiles
    assert np.asarray(tiled).std() > 0
    # An odd-sized input is padded for the model and cropped back to exactly 4x. (Sizes here stay
    # at 32x32 model inputs: each new input shape costs seconds of CPU kernel warm-up.)
    odd = upscale_x4(pipe, source.crop((0, 0, 30, 29)), SdUpscaleSettings(steps=2))
    assert odd.size == (120, 116)


def test_hires_fix_with_the_sd_x4_upscaler(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Hires fix runs the x4 upscaler with its default settings; 2 steps instead of 20 keep this fast.
    runner = engine._sd_x4_upscaler
    monkeypatch.setattr(engine, "_sd_x4_upscaler", lambda settings=None: runner(SdUpscaleSettings(steps=2)))
    request = Txt2ImgRequest(
        prompt="a house",
        width=64,
        height=64,
        steps=2,
        seed=3,
        enable_hr=True,
        hr_upscaler=TINY,
        hr_resize_x=96,
        hr_resize_y=0,
        denoising_strength=0.4,
    )
    result = engine.run(request)
    assert result.images[0].image.size == (96, 96)
    assert f"Hires upscaler: {TINY}" in result.images[0].infotext


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("broken-weights", r"unet/diffusion_pytorch_model\.safetensors is damaged"),
        ("half-copied", r"half-copied has no model_index\.json"),
        (
            "no-low-res-scheduler",
            r"missing vae/diffusion_pytorch_model\.safetensors, low_res_scheduler/scheduler_config\.json",
        ),
    ],
)
def test_damaged_or_incomplete_folders_say_what_is_wrong(
    engine: Any, photo: Path, name: str, message: str
) -> None:
    request = ExtrasRequest(image=str(photo), upscaler_1=f"SD x4 ({name})", upscaling_resize=4)
    with pytest.raises(SdUpscalerLoadError, match=message):
        engine.run(request)


def test_single_file_loads_offline_like_the_folder(tmp_path: Path, x4_root: Path) -> None:
    folder = x4_root / "SD-Upscaler" / "tiny-x4"
    single = save_single_file(tiny_x4_pipeline(), tmp_path / "SD-Upscaler" / "tiny-x4-ema.safetensors")
    # The tiny model's configs, laid out like configs/sd-x4-upscaler (no weights, no vocabulary).
    config_dir = tmp_path / "configs"
    shutil.copytree(folder, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
    assert [name for name, _ in _listed(tmp_path)] == ["SD x4 (tiny-x4-ema)"]
    from_file = load_sd_upscaler(single, config_dir=config_dir)
    from_folder = load_sd_upscaler(folder)
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = (
            getattr(from_file, component).state_dict(),
            getattr(from_folder, component).state_dict(),
        )
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), component
    source = Image.open(_image(tmp_path / "small.png", (16, 16)))
    settings = SdUpscaleSettings(steps=2)
    assert np.array_equal(
        np.asarray(upscale_x4(from_file, source, settings)),
        np.asarray(upscale_x4(from_folder, source, settings)),
    )


def _listed(models_root: Path) -> list[tuple[str, str]]:
    return [(entry["name"], entry["model_name"]) for entry in upscaler_catalogue(models_root)][3:]


def test_bad_single_files_are_named(tmp_path: Path) -> None:
    from tests.tiny_models import save_single_file as save_sd_checkpoint
    from tests.tiny_models import tiny_pipeline

    truncated = tmp_path / "x4-upscaler-ema.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SdUpscalerLoadError, match=r"x4-upscaler-ema\.safetensors"):
        load_sd_upscaler(truncated)
    sd1 = save_sd_checkpoint(
        tiny_pipeline("sd1"), tmp_path / "tiny-sd1.safetensors", "sd1", sidecar_yaml=False
    )
    with pytest.raises(SdUpscalerLoadError, match=r"tiny-sd1\.safetensors: not an original-layout SD x4"):
        load_sd_upscaler(sd1)
    with pytest.raises(StudioError, match="no longer exists"):
        load_sd_upscaler(tmp_path / "gone.safetensors")


def test_settings_are_checked_before_loading(tmp_path: Path) -> None:
    with pytest.raises(UpscaleRequestError, match="noise level 400"):
        SdUpscaleSettings(noise_level=400).check()
    with pytest.raises(UpscaleRequestError, match="tile size 8"):
        SdUpscaleSettings(tile=8).check()
    with pytest.raises(ValueError, match="sd_upscale_noise_level"):
        ExtrasRequest(image="x.png", sd_upscale_noise_level=351)
    # Empty prompt and negative prompt: guidance would change nothing, so it is skipped.
    assert not SdUpscaleSettings().guided
    assert SdUpscaleSettings(prompt="a cat").guided


def test_out_of_memory_halves_the_tile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pipelines.postprocess.sd_upscaler as sd_upscaler

    tiles: list[int] = []

    def fake_upscale(
        pipe: Any, image: Image.Image, settings: SdUpscaleSettings, progress: Any
    ) -> Image.Image:
        tiles.append(settings.tile)
        if settings.tile > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return image.resize((image.width * 4, image.height * 4))

    class FakeCache(SdUpscalerCache):
        def get(self, path: Path, options: Any = None) -> Any:
            return object()

    monkeypatch.setattr(sd_upscaler, "upscale_x4", fake_upscale)
    runner = SdX4Upscaler(FakeCache())
    result = runner.upscale_to_cover(Image.new("RGB", (200, 100)), tmp_path, (800, 400))
    assert result.size == (800, 400)
    assert tiles == [128, 64]
    assert runner.used


def test_shipped_configs_describe_the_real_model() -> None:
    import yaml
    from diffusers import AutoencoderKL, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
        infer_diffusers_model_type,
    )

    from pipelines.models.family_configs import _read_json

    directory = SD_UPSCALER_CONFIG_DIR
    assert StableDiffusionUpscalePipeline.load_config(str(directory))["_class_name"] == (
        "StableDiffusionUpscalePipeline"
    )
    unet_json = _read_json(directory / "unet" / "config.json")
    vae_json = _read_json(directory / "vae" / "config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_json)
        vae = AutoencoderKL.from_config(vae_json)
    assert sum(p.numel() for p in unet.parameters()) == 473_398_020
    # diffusers' own LDM -> diffusers config converters, fed the original yaml, agree with the JSON.
    original = yaml.safe_load((directory / "original.yaml").read_text(encoding="utf-8"))
    checkpoint = {  # the tensors model-type detection looks at, with the real shapes
        "model.diffusion_model.input_blocks.0.0.weight": torch.empty((256, 7, 3, 3), device="meta"),
        "model.diffusion_model.input_blocks.10.0.skip_connection.bias": torch.empty((1024,), device="meta"),
    }
    assert infer_diffusers_model_type(checkpoint) == "upscale"
    for derived, model in (
        (create_unet_diffusers_config_from_ldm(original, checkpoint), unet),
        (create_vae_diffusers_config_from_ldm(original, checkpoint), vae),
    ):
        for key, value in derived.items():
            if key != "sample_size":  # a tiling hint, not architecture
                assert json.dumps(model.config[key]) == json.dumps(value), key
    text_encoder = _read_json(directory / "text_encoder" / "config.json")
    assert text_encoder["hidden_size"] == unet_json["cross_attention_dim"] == 1024
    special = _read_json(directory / "tokenizer" / "special_tokens_map.json")
    assert special["pad_token"] == "!"
