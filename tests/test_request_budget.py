"""The memory budget and the typed ``override_settings``, checked by the request models themselves:
every caller (UI, API, CLI, batch) gets the same refusal, before anything is decoded or queued."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from contract.budget import (
    MAX_PIXELS_ENV,
    current_budget,
    derived_max_pixels,
    local_files_unreadable,
    model_upscale_side_factor,
    set_max_pixels,
)
from contract.images import ExtrasRequest, Img2ImgRequest, Txt2ImgRequest, format_validation_error
from contract.talking_head import TalkingHeadRequest

ROOT = Path(__file__).resolve().parent.parent
# a whole 8x8 PNG: images are decoded when a request is built
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAADElEQVR4nGNgGB4AAADIAAGtQHYiAAAAAElFTkSuQmCC"


def png_base64(width: int, height: int, mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def huge_png() -> str:
    """The issue's request: a 12000x12000 1-bit PNG, about 17 KB."""
    encoded = png_base64(12000, 12000, mode="1")
    assert len(base64.b64decode(encoded)) < 20_000
    return encoded


@pytest.fixture()
def budget(monkeypatch: pytest.MonkeyPatch) -> int:
    """A small explicit budget (1 megapixel) so each check can be tripped with small numbers."""
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000000")
    return 1_000_000


def refusal(build: object) -> str:
    with pytest.raises(ValidationError) as caught:
        build()  # type: ignore[operator]
    return format_validation_error(caught.value)


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    data = b"\x00\x00" * int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_the_issue_extras_request_is_refused_naming_field_and_limit(huge_png: str) -> None:
    message = refusal(lambda: ExtrasRequest(image=huge_png, upscaling_resize=8, upscaler_1="Lanczos"))
    assert message.startswith("image: ") and "megapixels" in message


def test_extras_output_and_intermediate_sizes(budget: int) -> None:
    small = png_base64(400, 400)
    ExtrasRequest(image=small, upscaling_resize=2, upscaler_1="Lanczos")  # 800x800: fits
    ExtrasRequest(image=small, upscaling_resize=8)  # no upscaler: nothing grows
    message = refusal(lambda: ExtrasRequest(image=small, upscaling_resize=4, upscaler_1="Lanczos"))
    assert message.startswith("upscaling_resize: the upscaled image would be 1600x1600")
    assert "1.0 megapixels" in message and "--max-pixels" in message
    # A model upscaler (4x) asked for 2x makes a 1600x1600 intermediate first.
    message = refusal(lambda: ExtrasRequest(image=small, upscaling_resize=2, upscaler_1="4x-UltraSharp"))
    assert message.startswith("upscaler_1: '4x-UltraSharp' works at an intermediate size")
    message = refusal(
        lambda: ExtrasRequest(
            image=small, resize_mode=1, upscaling_resize_w=2048, upscaling_resize_h=2048, upscaler_1="Nearest"
        )
    )
    assert message.startswith("upscaling_resize_w: ")
    assert model_upscale_side_factor(2) == 4 and model_upscale_side_factor(8) == 16
    assert model_upscale_side_factor(1) == 1


def test_img2img_init_mask_and_outpaint_sizes(huge_png: str, budget: int) -> None:
    assert refusal(lambda: Img2ImgRequest(init_images=[huge_png])).startswith(
        "init_images.0: the image 12000x12000"
    )
    small = png_base64(640, 640)
    Img2ImgRequest(init_images=[small], width=512, height=512)
    big = png_base64(1200, 1000)
    assert refusal(lambda: Img2ImgRequest(init_images=[small, big])).startswith("init_images.1: ")
    assert refusal(lambda: Img2ImgRequest(init_images=[small], mask=big)).startswith("mask: ")
    message = refusal(lambda: Img2ImgRequest(init_images=[small], outpaint_left=512, outpaint_right=512))
    assert message.startswith("outpaint_left: the outpainted canvas would be 1664x640")


def test_generation_and_hires_sizes(budget: int) -> None:
    Txt2ImgRequest(width=1000, height=1000)
    assert refusal(lambda: Txt2ImgRequest(width=1024, height=1024)).startswith("width: ")
    message = refusal(lambda: Txt2ImgRequest(enable_hr=True, width=512, height=512, hr_scale=2))
    assert message.startswith("hr_scale: the hires fix's second pass would be 1024x1024")
    assert refusal(lambda: Txt2ImgRequest(enable_hr=True, hr_resize_x=1536)).startswith("hr_resize_x: ")
    Txt2ImgRequest(width=512, height=512, hr_scale=4)  # hires off: the scale is unused


def test_budget_is_derived_from_ram_without_torch_and_settable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    derived = derived_max_pixels()
    assert derived.max_pixels >= 4096 * 4096 and "RAM" in derived.source
    assert current_budget() == derived
    set_max_pixels(2_000_000)
    try:
        assert current_budget().max_pixels == 2_000_000
    finally:
        set_max_pixels(None)
    code = (
        "import sys\n"
        "from contract.images import ExtrasRequest, Img2ImgRequest\n"
        "from contract.budget import current_budget\n"
        "current_budget()\n"
        f"Img2ImgRequest(init_images=['{TINY_PNG}'])\n"
        "assert 'torch' not in sys.modules, 'validation imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_override_settings_are_typed_and_unknown_keys_pass_through() -> None:
    for value in ([], {}, "many", 1.5, True, 0, 13):
        message = refusal(
            lambda value=value: Txt2ImgRequest(override_settings={"CLIP_stop_at_last_layers": value})
        )
        assert message.startswith("override_settings.CLIP_stop_at_last_layers: "), (value, message)
    for key in ("sd_model_checkpoint", "sd_vae", "face_restoration_model"):
        for value in ([], {}, 3, True):
            message = refusal(lambda key=key, value=value: Txt2ImgRequest(override_settings={key: value}))
            assert message.startswith(f"override_settings.{key}: "), (key, value, message)
    assert refusal(lambda: Txt2ImgRequest(override_settings={"eta_noise_seed_delta": -1})).startswith(
        "override_settings.eta_noise_seed_delta: "
    )
    request = Txt2ImgRequest(
        override_settings={"CLIP_stop_at_last_layers": "2", "sd_vae": None, "anything": [{"x": 1}]}
    )
    assert request.clip_skip == 2 and request.vae is None
    assert request.override_settings["anything"] == [{"x": 1}]
    assert Img2ImgRequest(init_images=[png_base64(8, 8)], override_settings={"x": {}}).override_settings == {
        "x": {}
    }


def test_talking_head_portrait_and_wav_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    portrait = tmp_path / "face.png"
    Image.new("RGB", (64, 64)).save(portrait)
    speech = tmp_path / "speech.wav"
    speech.write_bytes(wav_bytes(3.0))
    TalkingHeadRequest(image=portrait, audio=speech)
    monkeypatch.setenv("SDSTUDIO_MAX_AUDIO_SECONDS", "2")
    message = refusal(lambda: TalkingHeadRequest(image=portrait, audio=speech))
    assert message.startswith("audio: the speech is 3 s long") and "2 s" in message
    monkeypatch.delenv("SDSTUDIO_MAX_AUDIO_SECONDS")
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    assert refusal(lambda: TalkingHeadRequest(image=portrait, audio=speech)).startswith("image: ")


def test_named_files_are_not_opened_inside_the_api(tmp_path: Path, budget: int) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000)).save(big)
    assert refusal(lambda: Img2ImgRequest(init_images=[str(big)])).startswith("init_images.0: ")
    with local_files_unreadable():
        Img2ImgRequest(init_images=[str(big)])  # not measured: a client's path is never opened
