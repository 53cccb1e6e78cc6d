"""ControlNet: loading both on-disk layouts, preprocessors, units and the diffusers pipeline inputs."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from contract.controlnet import ControlNetUnit
from pipelines.controlnet.apply import (
    build_controlnet_pipeline,
    load_unit_image,
    prepare_control_inputs,
    soft_injection_scales,
    wrap_for_control_mode,
)
from pipelines.controlnet.model_files import ControlNetCache, model_catalogue
from pipelines.controlnet.preprocessors import (
    pixel_perfect_resolution,
    preprocessor_catalogue,
    resize_control_image,
    run_preprocessor,
)
from pipelines.errors import (
    AnnotatorMissingError,
    ControlNetError,
    ControlNetFamilyError,
    ControlNetNotFoundError,
)
from pipelines.models.checkpoint_export import _apply_module_map, _keep, _unet_module_map
from pipelines.models.families import ModelFamily
from tests.tiny_models import tiny_pipeline

SD1 = ModelFamily("sd1")
SIZE = 64


def tiny_controlnet(pipe: Any, seed: int) -> Any:
    """A ControlNet copied from the tiny UNet, with random (not zero) output layers so the control
    image matters. The conditioning encoder downsamples by 2, like the tiny VAE."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.5)
            torch.nn.init.zeros_(module.bias)
        torch.nn.init.normal_(controlnet.controlnet_cond_embedding.conv_out.weight, std=0.5)
    return controlnet.eval()


def original_layout(controlnet: Any) -> dict[str, torch.Tensor]:
    """A ControlNet's state dict in the original cldm layout (without the ``control_model.``
    prefix): the inverse of diffusers' converter, built on the UNet key mapping of
    :mod:`pipelines.models.checkpoint_export`."""
    config = dict(controlnet.config)
    config["up_block_types"] = [t.replace("Down", "Up") for t in reversed(config["down_block_types"])]
    module_map = _unet_module_map(config)
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    module_map["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", _keep)
    for index in range(blocks):
        module_map[f"controlnet_cond_embedding.blocks.{index}"] = (
            f"input_hint_block.{2 * (index + 1)}",
            _keep,
        )
    module_map["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (blocks + 1)}", _keep)
    for index in range(len(controlnet.controlnet_down_blocks)):
        module_map[f"controlnet_down_blocks.{index}"] = (f"zero_convs.{index}.0", _keep)
    module_map["controlnet_mid_block"] = ("middle_block_out.0", _keep)
    return _apply_module_map(controlnet.state_dict(), module_map, "ControlNet")


def export_original_layout(controlnet: Any, path: Path) -> None:
    converted = original_layout(controlnet)
    save_file({f"control_model.{k}": v.contiguous() for k, v in converted.items()}, str(path))


@pytest.fixture(scope="module")
def pipe() -> Any:
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sdxl_pipe() -> Any:
    return tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def originals(pipe: Any) -> dict[str, Any]:
    return {"single": tiny_controlnet(pipe, seed=1), "folder": tiny_controlnet(pipe, seed=2)}


@pytest.fixture(scope="module")
def controlnet_dir(
    tmp_path_factory: pytest.TempPathFactory, originals: dict[str, Any], sdxl_pipe: Any
) -> Path:
    folder = tmp_path_factory.mktemp("ControlNet")
    export_original_layout(originals["single"], folder / "tiny_canny_sd15.safetensors")
    originals["folder"].save_pretrained(folder / "tiny-depth-diffusers", safe_serialization=True)
    tiny_controlnet(sdxl_pipe, seed=3).save_pretrained(folder / "tiny-xl", safe_serialization=True)
    (folder / "annotators").mkdir()
    (folder / "annotators" / "ControlNetHED.pth").write_bytes(b"not really weights")
    return folder


@pytest.fixture(scope="module")
def cache(controlnet_dir: Path) -> ControlNetCache:
    return ControlNetCache(controlnet_dir, capacity=3)


def pattern_image(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    generator = np.random.default_rng(seed)
    blocks = generator.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def generate(pipe: Any, control: Any) -> np.ndarray:
    from diffusers import DDIMScheduler

    controlled = build_controlnet_pipeline(pipe, control.controlnet)
    # DDIM: one UNet pass per step (the tiny pipeline's PNDM makes three for two steps).
    controlled.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return controlled(
        "a house",
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        **control.pipeline_kwargs(),
    ).images


# --- loading ---------------------------------------------------------------------------------------


def test_single_file_and_diffusers_folder_load_the_original_weights(
    cache: ControlNetCache, originals: dict[str, Any]
) -> None:
    for name, original in (
        ("tiny_canny_sd15", originals["single"]),
        ("tiny-depth-diffusers", originals["folder"]),
    ):
        loaded = cache.get(name)
        assert loaded.base == "sd1" and loaded.family_label == "SD1.x"
        expected = original.state_dict()
        actual = loaded.model.state_dict()
        assert set(actual) == set(expected)
        assert all(torch.equal(actual[k], expected[k]) for k in expected), name
        assert list(loaded.model.config.conditioning_embedding_out_channels) == [16, 32]
    assert cache.get("TINY_CANNY_SD15 [0123abcd]").model is cache.get("tiny_canny_sd15").model
    assert cache.get("tiny-xl").base == "sdxl"


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("sd1", {}),  # diffusers' defaults are SD1.5's ControlNet (lllyasviel/control_v11p_sd15_*)
        (
            "sdxl",
            {
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "block_out_channels": [320, 640, 1280],
                "transformer_layers_per_block": [1, 2, 10],
                "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
            },
        ),
    ],
)
def test_full_size_layouts_are_read_from_shapes(family: str, config: dict[str, Any]) -> None:
    """The real SD1.5 and SDXL ControlNet architectures, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    from pipelines.controlnet.model_files import (
        _convert_ldm_controlnet,
        base_from_config,
        controlnet_config_from_ldm,
    )

    with init_empty_weights():
        reference = ControlNetModel(**config)
    original = original_layout(reference)
    derived = controlnet_config_from_ldm(original)
    for key in (
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "conditioning_embedding_out_channels",
        "addition_embed_type",
        "projection_class_embeddings_input_dim",
    ):
        expected = reference.config[key]
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert derived.get(key) == expected, key
    expected_depths = reference.config["transformer_layers_per_block"]
    if isinstance(expected_depths, int):
        expected_depths = [expected_depths] * len(derived["block_out_channels"])
    assert derived["transformer_layers_per_block"] == list(expected_depths)
    assert base_from_config(derived) == family
    converted = _convert_ldm_controlnet(original, derived)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }


def test_sidecar_yaml_sets_the_attention_heads(originals: dict[str, Any]) -> None:
    from pipelines.controlnet.model_files import controlnet_config_from_ldm

    state = original_layout(originals["single"])
    assert controlnet_config_from_ldm(state)["attention_head_dim"] == 8  # SD1's standard 8 heads
    yaml = {"model": {"params": {"control_stage_config": {"params": {"num_head_channels": 16}}}}}
    assert controlnet_config_from_ldm(state, original_config=yaml)["attention_head_dim"] == [2, 4]


def test_model_catalogue_lists_models_with_short_hashes_and_skips_annotators(controlnet_dir: Path) -> None:
    names = model_catalogue(controlnet_dir)["model_list"]
    assert [n.rsplit(" ", 1)[0] for n in names] == ["tiny-depth-diffusers", "tiny-xl", "tiny_canny_sd15"]
    assert all(len(n.rsplit(" [", 1)[1]) == 9 and n.endswith("]") for n in names)


def test_unknown_model_names_close_matches(cache: ControlNetCache) -> None:
    with pytest.raises(ControlNetNotFoundError, match="tiny_canny_sd15"):
        cache.get("tiny_cany_sd15")


def test_wrong_family_is_a_clear_error(cache: ControlNetCache) -> None:
    unit = ControlNetUnit(enabled=True, module="none", model="tiny-xl", image=as_base64(pattern_image(0)))
    with pytest.raises(ControlNetFamilyError) as caught:
        prepare_control_inputs([unit], cache, width=SIZE, height=SIZE, family=SD1)
    assert "ControlNet Unit 0: ControlNet tiny-xl is for SDXL but the loaded checkpoint is SD1.x" in str(
        caught.value
    )


# --- generation ------------------------------------------------------------------------------------


def test_one_unit_controls_the_image(pipe: Any, cache: ControlNetCache) -> None:
    outputs = []
    for seed in (10, 11):
        unit = ControlNetUnit(
            enabled=True, module="none", model="tiny_canny_sd15", image=as_base64(pattern_image(seed))
        )
        control = prepare_control_inputs([unit], cache, width=SIZE, height=SIZE, family=SD1)
        assert control is not None and not hasattr(control.controlnet, "nets") and not control.guess_mode
        assert control.images[0].size == (SIZE, SIZE)
        outputs.append(generate(pipe, control))
    assert outputs[0].shape == (1, SIZE, SIZE, 3)
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3


def test_two_units_with_modes_weights_and_guidance_windows(
    pipe: Any, cache: ControlNetCache, tmp_path: Path
) -> None:
    image_file = tmp_path / "edges.png"
    pattern_image(20, (96, 64)).save(image_file)
    units = [
        ControlNetUnit(
            enabled=True,
            module="canny",
            model="tiny_canny_sd15",
            image=str(image_file),
            weight=0.8,
            resize_mode=2,
            pixel_perfect=True,
            control_mode="My prompt is more important",
        ),
        ControlNetUnit(
            enabled=True,
            module="invert",
            model="tiny-depth-diffusers",
            image="data:image/png;base64," + as_base64(pattern_image(21)),
            guidance_end=0.5,
            control_mode=2,
        ),
        ControlNetUnit(enabled=False, model="missing-model"),
    ]
    control = prepare_control_inputs(units, cache, width=SIZE, height=SIZE, family=SD1, image_dirs=[tmp_path])
    assert control is not None and len(control.controlnet.nets) == 2
    assert control.conditioning_scale == [0.8, 1.0]
    assert (control.guidance_start, control.guidance_end) == ([0.0, 0.0], [1.0, 0.5])
    assert not control.guess_mode and all(image.size == (SIZE, SIZE) for image in control.images)
    # Pixel perfect: the 96x64 image fills 64x64 at scale 2/3, so canny runs with a 43 px short side.
    assert control.detected_maps[0].size == (64, 43)
    first = generate(pipe, control)
    units[1] = units[1].model_copy(update={"image": as_base64(pattern_image(22))})
    second = generate(pipe, prepare_control_inputs(units, cache, width=SIZE, height=SIZE, family=SD1))
    # The second unit acts in the first of two steps only, on the conditional half, softly.
    assert np.abs(first - second).max() > 1e-3
    assert prepare_control_inputs(units[2:], cache, width=SIZE, height=SIZE, family=SD1) is None


def test_controlnet_is_more_important_uses_guess_mode_on_sd1(cache: ControlNetCache) -> None:
    unit = ControlNetUnit(
        enabled=True,
        module="none",
        model="tiny_canny_sd15",
        image=as_base64(pattern_image(1)),
        control_mode="ControlNet is more important",
    )
    control = prepare_control_inputs([unit], cache, width=SIZE, height=SIZE, family=SD1)
    assert control is not None and control.guess_mode and control.pipeline_kwargs()["guess_mode"]
    assert "control_image" in control.pipeline_kwargs("img2img")


def test_sdxl_per_unit_control_mode(sdxl_pipe: Any, cache: ControlNetCache) -> None:
    """SDXL gets the adapter (diffusers' guess-mode factors differ there); it must split SDXL's
    extra conditioning (pooled text, time ids) along with the batch."""
    outputs = {}
    for mode in ("Balanced", "ControlNet is more important"):
        unit = ControlNetUnit(
            enabled=True,
            module="none",
            model="tiny-xl",
            image=as_base64(pattern_image(30)),
            control_mode=mode,
        )
        control = prepare_control_inputs([unit], cache, width=SIZE, height=SIZE, family="sdxl")
        assert control is not None and not control.guess_mode
        assert hasattr(control.controlnet, "nets") == (mode != "Balanced")
        outputs[mode] = generate(sdxl_pipe, control)
    assert outputs["Balanced"].shape == (1, SIZE, SIZE, 3)
    assert np.abs(outputs["Balanced"] - outputs["ControlNet is more important"]).max() > 1e-3


def test_control_mode_adapter_matches_the_extension(originals: dict[str, Any]) -> None:
    controlnet = originals["single"]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    hint = torch.rand(2, 3, 32, 32, generator=generator)
    kwargs = {"encoder_hidden_states": context, "controlnet_cond": hint, "conditioning_scale": 0.5}
    with torch.no_grad():
        plain_down, plain_mid = controlnet(sample, 10, return_dict=False, **kwargs)
        prompt_down, prompt_mid = wrap_for_control_mode(controlnet, "My prompt is more important")(
            sample, 10, return_dict=False, **kwargs
        )
        control_down, control_mid = wrap_for_control_mode(controlnet, "ControlNet is more important")(
            sample, 10, return_dict=False, **kwargs
        )
    scales = soft_injection_scales(len(plain_down) + 1)
    assert scales[0] == pytest.approx(0.825**12) and len(scales) == 7
    for plain, soft, scale in zip([*plain_down, plain_mid], [*prompt_down, prompt_mid], scales, strict=True):
        torch.testing.assert_close(soft, plain * scale)
    for plain, cond_only, scale in zip(
        [*plain_down, plain_mid], [*control_down, control_mid], scales, strict=True
    ):
        assert torch.count_nonzero(cond_only[:1]) == 0  # unconditional half: no control
        torch.testing.assert_close(cond_only[1:], plain[1:] * scale, atol=1e-5, rtol=1e-4)


# --- preprocessors ---------------------------------------------------------------------------------


def test_canny_gives_a_binary_edge_map_at_the_processor_resolution() -> None:
    image = pattern_image(3, (96, 64))
    edges = np.asarray(run_preprocessor("canny", image, resolution=128, threshold_a=100, threshold_b=200))
    assert edges.shape == (128, 192, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges[..., 0], edges[..., 1]) and np.array_equal(edges[..., 0], edges[..., 2])
    strict = np.asarray(run_preprocessor("canny", image, resolution=128, threshold_a=250, threshold_b=255))
    assert (strict > 0).sum() < (edges > 0).sum()
    defaults = np.asarray(run_preprocessor("canny", image, resolution=-1, threshold_a=-1, threshold_b=-1))
    assert defaults.shape == (512, 768, 3)


def test_none_and_invert() -> None:
    image = pattern_image(4)
    assert np.array_equal(np.asarray(run_preprocessor("none", image)), np.asarray(image))
    inverted = run_preprocessor("invert (from white bg & black line)", image)
    assert np.array_equal(np.asarray(inverted), 255 - np.asarray(image))


def test_annotator_preprocessors_name_the_missing_file(controlnet_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AnnotatorMissingError) as caught:
        run_preprocessor("openpose", pattern_image(5), annotator_dir=tmp_path)
    message = str(caught.value)
    assert "body_pose_model.pth" in message and str(tmp_path) in message
    assert "https://huggingface.co/lllyasviel/Annotators/resolve/main/body_pose_model.pth" in message
    with pytest.raises(AnnotatorMissingError, match=r"dpt_hybrid-midas-501f0c75\.pt"):
        run_preprocessor("depth", pattern_image(5), annotator_dir=tmp_path)  # the extension's API name
    with pytest.raises(ControlNetError, match=r"cannot use ControlNetHED\.pth: not a readable weights file"):
        run_preprocessor("softedge_hed", pattern_image(5), annotator_dir=controlnet_dir / "annotators")


def test_preprocessor_catalogue_has_the_extension_shape() -> None:
    catalogue = preprocessor_catalogue()
    assert catalogue["module_list"][0] == "none"
    assert {"canny", "depth", "openpose", "lineart", "hed", "mlsd", "oneformer_ade20k"} <= set(
        catalogue["module_list"]
    )
    canny = catalogue["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert canny["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1}
    labels = preprocessor_catalogue(alias_names=True)["module_list"]
    assert {"depth_midas", "lineart_realistic", "softedge_hed", "seg_ofade20k"} <= set(labels)


def test_resize_modes_and_pixel_perfect() -> None:
    wide = np.zeros((50, 100, 3), dtype=np.uint8)
    wide[:, :, 1] = np.arange(100, dtype=np.uint8)[None, :]
    wide[0], wide[-1] = 200, 200
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        assert resize_control_image(wide, width=64, height=64, resize_mode=mode).shape == (64, 64, 3)
    filled = resize_control_image(wide, width=64, height=64, resize_mode="Resize and Fill")
    assert np.array_equal(filled[0, 0], filled[63, 63])  # padding with the border colour
    cropped = resize_control_image(wide, width=64, height=64, resize_mode="Crop and Resize")
    assert cropped[32, 0, 1] > 20  # the left edge was cropped away
    assert pixel_perfect_resolution(50, 100, width=64, height=64, resize_mode="Crop and Resize") == 64
    assert pixel_perfect_resolution(50, 100, width=64, height=64, resize_mode="Resize and Fill") == 32


# --- units -----------------------------------------------------------------------------------------


def error_fields(exc: ValidationError) -> set[str]:
    return {str(error["loc"][0]) for error in exc.errors()}


def test_unit_validation_errors_name_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        ControlNetUnit(weight=2.5)
    assert error_fields(caught.value) == {"weight"}
    with pytest.raises(ValidationError) as caught:
        ControlNetUnit(guidance_start=0.8, guidance_end=0.2)
    assert error_fields(caught.value) == {"guidance_end"}
    with pytest.raises(ValidationError) as caught:
        ControlNetUnit(module="depth_magic")
    assert error_fields(caught.value) == {"module"} and "canny" in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        ControlNetUnit(resize_mode=7, control_mode="Louder")
    assert error_fields(caught.value) == {"resize_mode", "control_mode"}


def test_unit_accepts_the_extension_spellings() -> None:
    unit = ControlNetUnit.model_validate(
        {"module": "depth", "resize_mode": 0, "control_mode": 1, "guidance": 0.7, "lowvram": True, "extra": 1}
    )
    assert (unit.module, unit.resize_mode, unit.control_mode) == (
        "depth_midas",
        "Just Resize",
        "My prompt is more important",
    )
    assert unit.guidance_end == 0.7 and unit.low_vram
    assert unit.enabled  # the extension's API units are on unless "enabled": false is sent
    assert ControlNetUnit(resize_mode="Inner Fit (Scale to Fit)").resize_mode == "Crop and Resize"


def test_unit_images_from_paths_and_base64(tmp_path: Path) -> None:
    image = pattern_image(6)
    path = tmp_path / "control.png"
    image.save(path)
    assert np.array_equal(np.asarray(load_unit_image(str(path))), np.asarray(image))
    assert np.array_equal(np.asarray(load_unit_image(as_base64(image))), np.asarray(image))
    with pytest.raises(ControlNetError, match="outside the allowed folders"):
        load_unit_image(str(path), image_dirs=[tmp_path / "elsewhere"])
    with pytest.raises(ControlNetError, match="neither an existing file nor base64"):
        load_unit_image("no/such/file.png")
