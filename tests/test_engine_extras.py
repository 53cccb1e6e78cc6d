"""Extras (upscale + face restore) through the engine, and hires fix with a model upscaler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.images import ExtrasRequest, Txt2ImgRequest
from pipelines.outputs.saving import read_png_parameters


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_lanczos_needs_no_model(studio, photo: Path) -> None:
    result = studio.engine.run(ExtrasRequest(image=str(photo), upscaler_1="Lanczos", upscaling_resize=2))
    saved = result.images[0]
    assert saved.image.size == (96, 80)
    assert saved.path.parent.parent.name == "extras-images"
    assert "Postprocess upscaler: Lanczos" in read_png_parameters(saved.path)


def test_model_upscaler_to_size_and_blend(studio, photo: Path) -> None:
    request = ExtrasRequest(
        image=str(photo),
        resize_mode=1,
        upscaling_resize_w=64,
        upscaling_resize_h=64,
        upscaler_1="2x-tiny-compact",
        upscaler_2="Nearest",
        extras_upscaler_2_visibility=0.5,
    )
    result = studio.engine.run(request)
    assert result.images[0].image.size == (64, 64)
    text = read_png_parameters(result.images[0].path)
    assert "Postprocess upscaler 2: Nearest" in text


def test_face_restore_without_weights_names_the_file(studio, photo: Path) -> None:
    from pipelines.errors import StudioError

    with pytest.raises(StudioError, match=r"GFPGAN.*launch\.py download"):
        studio.engine.run(ExtrasRequest(image=str(photo), gfpgan_visibility=1.0))


def test_unknown_upscaler_lists_the_choices(studio, photo: Path) -> None:
    from pipelines.errors import StudioError

    with pytest.raises(StudioError, match="2x-tiny-compact"):
        studio.engine.run(ExtrasRequest(image=str(photo), upscaler_1="4x-nonexistent"))


def test_hires_fix_with_a_model_upscaler(studio) -> None:
    request = Txt2ImgRequest(
        prompt="a house",
        width=64,
        height=64,
        steps=2,
        seed=3,
        enable_hr=True,
        hr_upscaler="2x-tiny-compact",
        hr_resize_x=96,
        hr_resize_y=0,
        denoising_strength=0.4,
    )
    result = studio.engine.run(request)
    assert result.images[0].image.size == (96, 96)
    assert "Hires resize: 96x96" in result.images[0].infotext
