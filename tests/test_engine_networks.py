"""LoRA tags, embeddings and ControlNet units through the engine, as a user's request uses them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from contract.images import Img2ImgRequest, Txt2ImgRequest

BASE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def networks(tiny_models_root: Path) -> Path:
    import torch

    from tests.test_controlnet import export_original_layout, tiny_controlnet
    from tests.test_extra_networks import kohya_lora
    from tests.tiny_models import tiny_pipeline

    pipe = tiny_pipeline("sd1", seed=0)
    lora = tiny_models_root / "Lora"
    lora.mkdir(exist_ok=True)
    save_file(
        kohya_lora(pipe, seed=1, unet_suffixes=("attn1.to_q", "attn2.to_k"), te_layer=0),
        str(lora / "grain.safetensors"),
    )
    embeddings = tiny_models_root.parent / "embeddings"
    embeddings.mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(5)
    save_file(
        {"emb_params": torch.randn(2, 32, generator=generator)}, str(embeddings / "shiny-style.safetensors")
    )
    controlnet = tiny_models_root / "ControlNet"
    controlnet.mkdir(exist_ok=True)
    export_original_layout(tiny_controlnet(pipe, seed=2), controlnet / "tiny_canny.safetensors")
    tiny_controlnet(pipe, seed=3).save_pretrained(controlnet / "tiny-depth", safe_serialization=True)
    return tiny_models_root


def pixels(studio, request) -> np.ndarray:
    result = studio.engine.run(request)
    return np.array(result.images[0].image), result


def test_lora_tag_changes_the_image_and_is_gone_next_job(studio, networks: Path) -> None:
    before, _ = pixels(studio, Txt2ImgRequest(**BASE))
    with_lora, result = pixels(studio, Txt2ImgRequest(**{**BASE, "prompt": "a lighthouse <lora:grain:1>"}))
    after, _ = pixels(studio, Txt2ImgRequest(**BASE))
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)
    assert 'Lora hashes: "grain: ' in result.images[0].infotext
    assert result.images[0].infotext.startswith("a lighthouse <lora:grain:1>\n")


def test_missing_lora_is_a_clear_error(studio, networks: Path) -> None:
    from pipelines.errors import StudioError

    with pytest.raises(StudioError, match="nosuchlora"):
        studio.engine.run(Txt2ImgRequest(**{**BASE, "prompt": "x <lora:nosuchlora:1>"}))
    assert studio.engine.run(Txt2ImgRequest(**BASE)).images


def test_embedding_is_used_by_file_name(studio, networks: Path) -> None:
    plain, _ = pixels(studio, Txt2ImgRequest(**{**BASE, "prompt": "a lighthouse, shiny"}))
    styled, _ = pixels(studio, Txt2ImgRequest(**{**BASE, "prompt": "a lighthouse, shiny-style"}))
    again, _ = pixels(studio, Txt2ImgRequest(**{**BASE, "prompt": "a lighthouse, shiny"}))
    assert not np.array_equal(plain, styled)
    assert np.array_equal(plain, again)


def control_image(shape: str) -> str:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    if shape == "box":
        draw.rectangle((12, 12, 50, 50), outline="white", width=3)
    else:
        draw.ellipse((8, 20, 56, 44), outline="white", width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unit(image: str, model: str = "tiny_canny", module: str = "canny", **extra: object) -> dict:
    return {"enabled": True, "module": module, "model": model, "image": image, "weight": 1.0, **extra}


def test_controlnet_units_steer_txt2img_and_img2img(studio, networks: Path) -> None:
    scripts = {"ControlNet": {"args": [unit(control_image("box"))]}}
    boxed, result = pixels(studio, Txt2ImgRequest(**BASE, alwayson_scripts=scripts))
    other, _ = pixels(
        studio,
        Txt2ImgRequest(**BASE, alwayson_scripts={"ControlNet": {"args": [unit(control_image("ellipse"))]}}),
    )
    assert not np.array_equal(boxed, other)
    assert "ControlNet 0: " in result.images[0].infotext
    two = Txt2ImgRequest(
        **BASE,
        controlnet_units=[
            unit(control_image("box")),
            unit(control_image("ellipse"), model="tiny-depth", module="none", weight=0.5, guidance_end=0.5),
        ],
    )
    both, _ = pixels(studio, two)
    assert not np.array_equal(both, boxed)
    init = control_image("ellipse")
    edited, _ = pixels(
        studio,
        Img2ImgRequest(
            **BASE, init_images=[init], denoising_strength=0.7, controlnet_units=[unit(control_image("box"))]
        ),
    )
    assert edited.shape == (64, 64, 3)


def test_controlnet_for_the_wrong_family_is_refused(studio, networks: Path) -> None:
    from pipelines.errors import StudioError

    with pytest.raises(StudioError, match="SD1"):
        studio.engine.run(
            Txt2ImgRequest(
                **{**BASE, "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}},
                controlnet_units=[unit(control_image("box"))],
            )
        )


def test_controlnet_steers_the_hires_pass_as_its_hr_option_says(studio, networks: Path) -> None:
    hires = {**BASE, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6}

    def run(option: str, shape: str) -> tuple[np.ndarray, object]:
        units = [unit(control_image(shape), module="none", hr_option=option)]
        return pixels(studio, Txt2ImgRequest(**hires, controlnet_units=units))

    both_box, result = run("Both", "box")
    assert both_box.shape == (128, 128, 3)
    assert "Hr Option: Both" in result.images[0].infotext
    # A unit for the second pass only: the control image changes the result, and the first pass is
    # the plain one (so "Low res only" with either image differs from it).
    high_box, _ = run("High res only", "box")
    high_ellipse, _ = run("High res only", "ellipse")
    assert not np.array_equal(high_box, high_ellipse)
    low_box, _ = run("Low res only", "box")
    plain, _ = pixels(studio, Txt2ImgRequest(**hires))
    assert not np.array_equal(low_box, plain)
    assert not np.array_equal(high_box, plain)
    assert not np.array_equal(both_box, low_box)
    assert not np.array_equal(both_box, high_box)
