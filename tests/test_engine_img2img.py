"""img2img, inpaint, outpaint and hires fix on tiny models."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from contract.images import Img2ImgRequest, Txt2ImgRequest

COMMON = {"prompt": "a cabin in the woods", "steps": 4, "seed": 21, "sampler_name": "Euler"}


def picture(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def mask_file(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    mask.save(path)
    return path


def pixels(image: Image.Image | Path) -> np.ndarray:
    return np.array((Image.open(image) if isinstance(image, Path) else image).convert("RGB")).astype(int)


def test_strength_zero_returns_the_input(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    result = studio.engine.img2img(
        Img2ImgRequest(**COMMON, init_images=[str(source)], denoising_strength=0.0, width=64, height=64)
    )
    assert np.array_equal(pixels(result.images[0].path), pixels(source))
    assert "Denoising strength: 0" in result.images[0].infotext


def test_strength_one_behaves_like_txt2img(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    img = studio.engine.img2img(
        Img2ImgRequest(**COMMON, init_images=[str(source)], denoising_strength=1.0, width=64, height=64)
    )
    txt = studio.engine.txt2img(Txt2ImgRequest(**COMMON, width=64, height=64))
    assert np.array_equal(pixels(img.images[0].image), pixels(txt.images[0].image))
    assert img.images[0].path.parent.parent.name == "img2img-images"


def test_partial_strength_changes_and_resizes(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png", size=(96, 64))
    b64 = "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode()
    for mode in (0, 1, 2):
        result = studio.engine.img2img(
            Img2ImgRequest(
                **COMMON, init_images=[b64], denoising_strength=0.5, width=64, height=64, resize_mode=mode
            )
        )
        image = result.images[0].image
        assert image.size == (64, 64)
        assert result.images[0].path.parent.parent.name == "img2img-images"


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sd1-inpaint"])
@pytest.mark.parametrize("full_res", [False, True])
def test_inpaint_keeps_unmasked_pixels_exactly(
    studio, tmp_path: Path, checkpoint: str, full_res: bool
) -> None:
    source = picture(tmp_path / "in.png")
    mask = mask_file(tmp_path / "mask.png", (64, 64), (16, 16, 40, 40))
    result = studio.engine.img2img(
        Img2ImgRequest(
            **COMMON,
            init_images=[str(source)],
            mask=str(mask),
            mask_blur=0,
            denoising_strength=0.9,
            width=64,
            height=64,
            inpaint_full_res=full_res,
            inpaint_full_res_padding=8,
            inpainting_fill=1,
            override_settings={"sd_model_checkpoint": checkpoint},
        )
    )
    out, original = pixels(result.images[0].path), pixels(source)
    keep = np.array(Image.open(mask)) == 0
    assert out.shape == original.shape
    assert np.array_equal(out[keep], original[keep])
    assert not np.array_equal(out[~keep], original[~keep])


def test_inverted_blurred_mask_and_fill_modes(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    mask = mask_file(tmp_path / "mask.png", (64, 64), (0, 0, 63, 31))
    for fill in (0, 2, 3):
        result = studio.engine.img2img(
            Img2ImgRequest(
                **COMMON,
                init_images=[str(source)],
                mask=str(mask),
                inpainting_mask_invert=1,
                mask_blur=2,
                inpainting_fill=fill,
                inpaint_full_res=False,
                width=64,
                height=64,
            )
        )
        out = pixels(result.images[0].path)
        # the top rows are far from the blurred edge of the (inverted) mask: unchanged
        assert np.array_equal(out[:24], pixels(source)[:24])


def test_mask_of_another_size_is_resized_and_said(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    mask = mask_file(tmp_path / "mask.png", (32, 32), (8, 8, 20, 20))
    result = studio.engine.img2img(
        Img2ImgRequest(**COMMON, init_images=[str(source)], mask=str(mask), width=64, height=64)
    )
    assert any("mask was 32x32; resized" in note for note in result.notes)


def test_empty_mask_returns_the_image_unchanged(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    empty = tmp_path / "empty.png"
    Image.new("L", (64, 64), 0).save(empty)
    result = studio.engine.img2img(
        Img2ImgRequest(**COMMON, init_images=[str(source)], mask=str(empty), width=64, height=64)
    )
    assert np.array_equal(pixels(result.images[0].path), pixels(source))
    assert any("mask is empty" in note for note in result.notes)


def test_outpaint_grows_the_canvas_and_keeps_the_centre(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    result = studio.engine.img2img(
        Img2ImgRequest(
            **COMMON,
            init_images=[str(source)],
            outpaint_left=16,
            outpaint_right=13,
            outpaint_down=8,
            mask_blur=0,
            denoising_strength=0.8,
            width=64,
            height=64,
        )
    )
    image = result.images[0].image
    assert image.size == (96, 72)  # 64+16+13 rounded up to a multiple of 8; 64+8
    inner = pixels(image)[8:56, 24:72]  # well inside the kept area (8 px overlap is repainted)
    assert np.array_equal(inner, pixels(source)[8:56, 8:56])


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_doubles_the_size(studio, upscaler: str) -> None:
    request = Txt2ImgRequest(
        **COMMON,
        width=64,
        height=64,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=upscaler,
        hr_second_pass_steps=2,
        denoising_strength=0.5,
    )
    result = studio.engine.txt2img(request)
    assert result.images[0].image.size == (128, 128)
    assert f"Hires upscaler: {upscaler}" in result.images[0].infotext
    assert "Hires upscale: 2" in result.images[0].infotext


def test_non_image_input_is_a_clear_error_and_writes_nothing(studio, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is not a picture")
    before = set(studio.engine.config.outputs_root.rglob("*"))
    # refused when the request is built, before any model is loaded, naming the field
    with pytest.raises(ValidationError, match=r"init_images\.0: not an image file \(text/plain\)"):
        Img2ImgRequest(**COMMON, init_images=[str(bogus)], width=64, height=64)
    with pytest.raises(ValidationError, match=r"init_images\.0: file not found: no such file\.png"):
        Img2ImgRequest(**COMMON, init_images=["no such file.png"], width=64, height=64)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(picture(tmp_path / "whole.png").read_bytes()[:200])
    with pytest.raises(ValidationError, match=r"mask: the image file is truncated"):
        Img2ImgRequest(**COMMON, init_images=[str(picture(tmp_path / "in.png"))], mask=str(truncated))
    after = set(studio.engine.config.outputs_root.rglob("*"))
    assert after == before


def test_batch_of_two_in_one_pass(studio, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.open(picture(tmp_path / "in.png")).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    result = studio.engine.img2img(
        Img2ImgRequest(**COMMON, init_images=[b64], batch_size=2, width=64, height=64, denoising_strength=0.6)
    )
    assert [img.seed for img in result.images] == [21, 22]


def test_latent_upscale_resize_mode_encodes_at_the_source_size(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png", size=(48, 32))
    common = {**COMMON, "init_images": [str(source)], "width": 96, "height": 64, "denoising_strength": 0.5}
    latent = studio.engine.img2img(Img2ImgRequest(**common, resize_mode=3)).images[0]
    pixel = studio.engine.img2img(Img2ImgRequest(**common, resize_mode=0)).images[0]
    assert latent.image.size == (96, 64)
    assert not np.array_equal(pixels(latent.image), pixels(pixel.image))
    assert "Resize mode: Just resize (latent upscale)" in latent.infotext
    unchanged = studio.engine.img2img(Img2ImgRequest(**{**common, "denoising_strength": 0.0}, resize_mode=3))
    assert unchanged.images[0].image.size == (96, 64)


def test_variation_seeds_apply_to_img2img_and_inpaint(studio, tmp_path: Path) -> None:
    source = picture(tmp_path / "in.png")
    mask = mask_file(tmp_path / "mask.png", (64, 64), (16, 16, 40, 40))
    common = {**COMMON, "init_images": [str(source)], "width": 64, "height": 64, "subseed": 7}
    for extra in (
        {"denoising_strength": 0.6},
        {"denoising_strength": 1.0, "mask": str(mask), "mask_blur": 0},
        {"denoising_strength": 0.8, "mask": str(mask), "mask_blur": 0},
    ):
        run = {**common, **extra}
        plain = studio.engine.img2img(Img2ImgRequest(**run, subseed_strength=0.0)).images[0]
        varied = studio.engine.img2img(Img2ImgRequest(**run, subseed_strength=0.5)).images[0]
        again = studio.engine.img2img(Img2ImgRequest(**run, subseed_strength=0.5)).images[0]
        other = studio.engine.img2img(Img2ImgRequest(**{**run, "subseed": 8}, subseed_strength=0.5)).images[0]
        assert not np.array_equal(pixels(plain.image), pixels(varied.image))
        assert np.array_equal(pixels(varied.image), pixels(again.image))
        assert not np.array_equal(pixels(varied.image), pixels(other.image))
        assert "Variation seed: 7, Variation seed strength: 0.5" in varied.infotext
        if "mask" in extra:  # the kept area is still the input's, exactly
            assert np.array_equal(pixels(varied.image)[:8], pixels(source)[:8])


def test_tiling_wraps_the_image_and_is_undone_after_the_job(studio) -> None:
    request = {**COMMON, "width": 64, "height": 64}
    plain = studio.engine.txt2img(Txt2ImgRequest(**request)).images[0]
    tiled = studio.engine.txt2img(Txt2ImgRequest(**request, tiling=True)).images[0]
    again = studio.engine.txt2img(Txt2ImgRequest(**request)).images[0]
    assert not np.array_equal(pixels(plain.image), pixels(tiled.image))
    assert np.array_equal(pixels(plain.image), pixels(again.image))
    assert "Tiling: True" in tiled.infotext and "Tiling" not in plain.infotext


class CentreFace:
    """A stand-in five-point detector: one face in the middle of a 64 x 64 picture."""

    name = "centre face"

    def __call__(self, rgb: np.ndarray) -> list:
        from pipelines.postprocess.face_restore import DetectedFace

        points = ((22.0, 26.0), (42.0, 26.0), (32.0, 36.0), (25.0, 46.0), (39.0, 46.0))
        return [DetectedFace(box=(12, 12, 40, 44), landmarks=points, eyes_detected=True)]


def test_restore_faces_runs_on_generated_images(studio, tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from pipelines.errors import StudioError
    from tests.test_face_restore import _tiny_restoreformer

    request = {**COMMON, "width": 64, "height": 64}
    with pytest.raises(StudioError, match="GFPGAN"):  # no weights in the test models: said clearly
        studio.engine.txt2img(Txt2ImgRequest(**request, restore_faces=True))
    (tmp_path / "GFPGAN").mkdir()
    save_file(_tiny_restoreformer(seed=0), tmp_path / "GFPGAN" / "RestoreFormer.safetensors")
    monkeypatch.setattr(studio.engine.config, "models_root", tmp_path)
    monkeypatch.setattr(studio.engine.config, "face_detector", CentreFace)
    choice = {"override_settings": {"face_restoration_model": "RestoreFormer"}}
    plain = studio.engine.txt2img(Txt2ImgRequest(**request)).images[0]
    restored = studio.engine.txt2img(Txt2ImgRequest(**request, **choice, restore_faces=True)).images[0]
    assert not np.array_equal(pixels(plain.image), pixels(restored.image))
    assert "Face restoration: RestoreFormer" in restored.infotext
    source = picture(tmp_path / "in.png")
    mask = mask_file(tmp_path / "mask.png", (64, 64), (16, 16, 40, 40))
    inpainted = studio.engine.img2img(
        Img2ImgRequest(
            **request, **choice, init_images=[str(source)], mask=str(mask), mask_blur=0, restore_faces=True
        )
    ).images[0]
    keep = np.array(Image.open(mask)) == 0
    assert np.array_equal(pixels(inpainted.image)[keep], pixels(source)[keep])


def test_img2img_can_upscale_its_pictures_as_extras_does(studio, tmp_path: Path) -> None:
    """``upscaler``/``upscale_by`` (what an img2img preset's upscale uses): each finished picture is
    upscaled, the infotext keeps the size img2img worked at and says how it was upscaled."""
    source = picture(tmp_path / "in.png", size=(64, 64))
    request = Img2ImgRequest(
        **{**COMMON, "width": 64, "height": 64},
        init_images=[str(source)],
        denoising_strength=0.5,
        upscaler="Lanczos",
        upscale_by=2,
    )
    result = studio.engine.img2img(request)
    saved = result.images[0]
    assert saved.image.size == (128, 128)
    assert "Size: 64x64" in saved.infotext
    assert "Postprocess upscaler: Lanczos, Postprocess upscale by: 2" in saved.infotext
    with pytest.raises(ValueError, match="upscale_by"):
        Img2ImgRequest(
            **COMMON, init_images=[str(source)], upscaler="Lanczos", upscale_by=8, width=8192, height=8192
        )
