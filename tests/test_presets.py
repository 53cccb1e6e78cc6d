"""Presets: saved from a request, run with a photo and a few words (queue, CLI, UI), equal to the
full request image for image; photos as phones send them; clear errors for what cannot run."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.presets import (
    PhotoError,
    PresetError,
    PresetModelMissingError,
    PresetStore,
    PromptRefusedError,
    build_preset_request,
    decode_photo,
    fit_longest_side,
    preset_from_request,
    read_preset_file,
    submit_preset_job,
)
from contract.images import Img2ImgRequest

CONTROLNET = "preset_canny"
EXIF_ORIENTATION = 0x0112
REQUEST = {
    "prompt": "game character, {prompt}, cel shading",
    "negative_prompt": "blurry",
    "sampler_name": "Euler",
    "steps": 2,
    "cfg_scale": 6,
    "denoising_strength": 0.7,
    "seed": 1234,  # left out of the preset: each run brings its own
    "init_images": ["data:image/png;base64,AAAA"],  # the photo the settings were tried on: left out
    "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
    "controlnet_units": [{"module": "canny", "model": CONTROLNET, "weight": 1.0, "image": "x"}],
}


@pytest.fixture(scope="module")
def controlnet(tiny_models_root: Path) -> str:
    from tests.test_controlnet import export_original_layout, tiny_controlnet
    from tests.tiny_models import tiny_pipeline

    folder = tiny_models_root / "ControlNet"
    folder.mkdir(exist_ok=True)
    target = folder / f"{CONTROLNET}.safetensors"
    if not target.exists():
        export_original_layout(tiny_controlnet(tiny_pipeline("sd1", seed=0), seed=2), target)
    return CONTROLNET


@pytest.fixture()
def presets(studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PresetStore:
    monkeypatch.setattr(studio.settings, "presets_dir", tmp_path / "presets")
    return PresetStore.for_services(studio)


def phone_photo(fmt: str = "JPEG", *, rotated: bool = True) -> bytes:
    """A 128x64 landscape picture stored sideways, as phones do: EXIF orientation 6 says "turn it
    90 degrees clockwise to show it", giving a 64x128 portrait. Its top-left is red once upright."""
    upright = Image.new("RGB", (64, 128), (40, 90, 200))
    upright.paste((230, 20, 20), (0, 0, 24, 24))
    stored = upright.transpose(Image.Transpose.ROTATE_90) if rotated else upright  # counter-clockwise
    buffer = io.BytesIO()
    exif = Image.Exif()
    if rotated:
        exif[EXIF_ORIENTATION] = 6
    if fmt == "HEIF":
        from app.presets import register_heif

        register_heif()
    stored.save(buffer, format=fmt, exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def expected_full_request(photo: bytes, words: str, seed: int) -> Img2ImgRequest:
    """The request a client would send by hand for the same photo: upright, 64x96 (longest side 96)."""
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB")
    assert upright.size == (64, 128)
    resized = upright.resize((64, 96), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    body: dict[str, Any] = {k: v for k, v in REQUEST.items() if k not in ("init_images", "controlnet_units")}
    unit = {"module": "canny", "model": CONTROLNET, "weight": 1.0, "image": encoded}
    return Img2ImgRequest(
        **{**body, "prompt": f"game character, {words}, cel shading", "seed": seed},
        init_images=[encoded],
        width=64,
        height=96,
        controlnet_units=[unit],
    )


def pixels(path_or_image: Any) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.array(image.convert("RGB"))


def save_game_preset(studio, presets: PresetStore, name: str = "game") -> Path:
    preset = preset_from_request(name, "img2img", REQUEST, longest_side=96, blocked_words=["gore"])
    return presets.save(preset, studio.registry, models_root=studio.settings.models_dir)


def test_fit_longest_side_keeps_the_aspect_in_multiples_of_eight() -> None:
    assert fit_longest_side(4032, 3024, 768) == (768, 576)
    assert fit_longest_side(3024, 4032, 512) == (384, 512)
    assert fit_longest_side(1000, 333, 512) == (512, 168)
    assert fit_longest_side(64, 128, 96) == (64, 96)


def test_preset_round_trip_through_the_queue_equals_the_full_request(studio, presets, controlnet) -> None:
    path = save_game_preset(studio, presets)
    text = path.read_text(encoding="utf-8")
    assert "{prompt}" in text and "init_images" not in text and "seed" not in text and "image:" not in text
    assert read_preset_file(path).request["controlnet_units"][0]["model"] == CONTROLNET

    photo = phone_photo("JPEG")
    queue = studio.start_queue()
    _, job_id = submit_preset_job(studio, presets, "game", "a knight", photo, owner="tester", seed=77)
    status = queue.wait(job_id, timeout=300)
    assert status.state == "done", status.error
    assert status.owner == "tester"
    ran = pixels(status.images[0])
    assert ran.shape == (96, 64, 3)

    reference = studio.engine.run(expected_full_request(photo, "a knight", 77)).images[0].image
    assert np.array_equal(ran, pixels(reference))


def test_exif_rotated_and_heic_photos_are_read_upright() -> None:
    for fmt in ("JPEG", "HEIF", "WEBP", "PNG"):
        image = decode_photo(phone_photo(fmt), max_bytes=10 * 2**20)
        assert image.size == (64, 128), fmt
        red, green, blue = image.getpixel((4, 4))
        assert red > 150 and blue < 120, (fmt, (red, green, blue))


def test_photos_are_checked_by_decoding_and_size() -> None:
    with pytest.raises(PhotoError, match="not a readable image"):
        decode_photo(b"GIF89a but not really an image", max_bytes=2**20)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(PhotoError, match="GIF images are not accepted"):
        decode_photo(gif.getvalue(), max_bytes=2**20)
    with pytest.raises(PhotoError, match="limit is"):
        decode_photo(phone_photo("PNG"), max_bytes=100)


def test_saving_checks_the_request_and_the_prompt_slot(studio, presets) -> None:
    with pytest.raises(PresetError, match=r"\{prompt\}"):
        presets.save(preset_from_request("plain", "txt2img", {"prompt": "a cat"}), studio.registry)
    with pytest.raises(PresetError, match=r"request\.steps"):
        presets.save(
            preset_from_request("bad", "txt2img", {"prompt": "{prompt}", "steps": 999}), studio.registry
        )
    with pytest.raises(ValueError, match="not a preset name"):
        preset_from_request("Bad Name!", "txt2img", {"prompt": "{prompt}"})
    with pytest.raises(PresetModelMissingError, match="nosuchmodel"):
        presets.save(
            preset_from_request(
                "missing",
                "txt2img",
                {"prompt": "{prompt}", "override_settings": {"sd_model_checkpoint": "nosuchmodel"}},
            ),
            studio.registry,
        )
    assert presets.names() == []


def test_a_preset_whose_model_was_removed_names_its_file(studio, presets, tiny_models_root: Path) -> None:
    checkpoints = tiny_models_root / "Stable-diffusion"
    doomed = checkpoints / "doomed-model.safetensors"
    doomed.symlink_to(checkpoints / "tiny-sd1.safetensors")
    try:
        studio.registry.refresh("checkpoint")
        body = {
            "prompt": "{prompt}",
            "steps": 2,
            "override_settings": {"sd_model_checkpoint": "doomed-model"},
        }
        path = presets.save(preset_from_request("doomed", "txt2img", body), studio.registry)
    finally:
        doomed.unlink()
    with pytest.raises(PresetModelMissingError) as caught:
        submit_preset_job(studio, presets, "doomed", "a cat", None, owner="tester")
    message = str(caught.value)
    assert str(path) in message and "doomed-model" in message and "Stable-diffusion" in message


def test_words_are_filtered_and_photos_required(studio, presets, controlnet) -> None:
    save_game_preset(studio, presets)
    preset = presets.load("game")
    with pytest.raises(PromptRefusedError, match="gore"):
        build_preset_request(preset, "lots of GORE please", phone_photo())
    assert build_preset_request(preset, "gorgeous armour", phone_photo()).prompt.startswith(
        "game character, gorgeous"
    )
    with pytest.raises(PhotoError, match="needs a photo"):
        build_preset_request(preset, "a knight", None)


def test_the_safety_checker_option_needs_its_files(studio, presets) -> None:
    body = {"prompt": "{prompt}", "steps": 2}
    with pytest.raises(PresetError, match="safety_checker"):
        presets.save(
            preset_from_request("checked", "txt2img", body, safety_checker=True),
            studio.registry,
            models_root=studio.settings.models_dir,
        )


def test_cli_runs_a_preset_like_the_full_request(studio, presets, controlnet, tmp_path: Path, capsys) -> None:
    from app.cli import main

    save_game_preset(studio, presets)
    photo_file = tmp_path / "photo.jpg"
    photo_file.write_bytes(phone_photo("JPEG"))
    settings = studio.settings.model_copy(update={"outputs_dir": tmp_path / "cli-out"})
    code = main(
        ["preset", "game", "--image", str(photo_file), "--prompt", "a knight", "--seed", "77"], settings
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0, printed
    image_path = Path(printed[-1])
    assert image_path.is_file() and (tmp_path / "cli-out") in image_path.parents
    reference = (
        studio.engine.run(expected_full_request(photo_file.read_bytes(), "a knight", 77)).images[0].image
    )
    assert np.array_equal(pixels(image_path), pixels(reference))

    assert main(["preset"], settings) == 0
    assert "game" in capsys.readouterr().out
    assert main(["preset", "nope", "--prompt", "x"], settings) == 1
    assert "No preset named 'nope'" in capsys.readouterr().err


def test_ui_tab_runs_a_preset_and_saves_from_the_last_job(
    studio, presets, controlnet, tmp_path: Path
) -> None:
    import gradio as gr

    from app.ui import presets_tab
    from app.ui.job_runner import JobRunner, TabSession

    save_game_preset(studio, presets)
    photo_file = tmp_path / "photo.heic"
    photo_file.write_bytes(phone_photo("HEIF"))
    runner = JobRunner(studio)
    session = TabSession()
    updates = list(
        presets_tab.run_preset(runner, session, "game", str(photo_file), "a knight", 77, "ui-user")
    )
    assert updates[-1].state == "done", updates[-1].text
    assert len(session.images) == 1
    reference = (
        studio.engine.run(expected_full_request(photo_file.read_bytes(), "a knight", 77)).images[0].image
    )
    assert np.array_equal(pixels(session.images[0].path), pixels(reference))

    # "Save as preset" from this user's last job: its images and seed stay behind
    kind, body = presets_tab.last_job_settings(studio, "ui-user")
    assert kind == "img2img" and '"init_images"' not in body and '"seed"' not in body
    with pytest.raises(PresetError, match=r"\{prompt\}"):  # the user's words must get a slot
        presets_tab.save_preset(studio, "again", kind, body)
    body = body.replace("a knight", "{prompt}")
    message = presets_tab.save_preset(studio, "again", kind, body, longest_side=96)
    assert "again.yaml" in message
    with pytest.raises(ValueError, match="exists"):
        presets_tab.save_preset(studio, "again", kind, body)
    assert presets.names() == ["again", "game"]
    assert "Not ready" not in presets_tab.preset_summary(studio, "again")

    # "Save as preset" in the txt2img/img2img tabs: the tab's current values, a prompt template
    tab_values = {
        "prompt": "a cat",
        "steps": 2,
        "seed": 5,
        "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
    }
    with pytest.raises(PresetError, match=r"\{prompt\}"):
        presets_tab.save_tab_settings(studio, "txt2img", tab_values, "from-tab")
    presets_tab.save_tab_settings(studio, "txt2img", tab_values, "from-tab", "sketch of {prompt}")
    saved = presets.load("from-tab")
    assert saved.mode == "txt2img" and saved.request["prompt"] == "sketch of {prompt}"
    assert "seed" not in saved.request and not saved.needs_photo

    with gr.Blocks():
        presets_tab.build(studio)


def test_a_controlnet_unit_naming_no_annotator_takes_the_photo_through_canny() -> None:
    body = {"prompt": "{prompt}", "steps": 2, "controlnet_units": [{"model": CONTROLNET, "weight": 0.8}]}
    preset = preset_from_request("edges", "txt2img", body, longest_side=96)
    assert preset.needs_photo
    request = build_preset_request(preset, "a knight", phone_photo("PNG"))
    unit = request.controlnet_units[0]
    assert unit.module == "canny" and unit.image and (request.width, request.height) == (64, 96)


def tiny_safety_checker(folder: Path, *, flags_everything: bool) -> None:
    """A random-weight safety checker whose concept thresholds flag every image (or none)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0 if flags_everything else 10.0)
        checker.special_care_embeds_weights.fill_(10.0)
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )


def test_a_checked_preset_is_screened_in_the_worker_before_any_file_exists(studio, presets) -> None:
    """The flagged picture never reaches outputs/: the worker sends a black image marked held back."""
    import shutil

    folder = Path(studio.settings.models_dir) / "safety_checker"
    tiny_safety_checker(folder, flags_everything=True)
    try:
        body = {"prompt": "a {prompt}", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
        presets.save(
            preset_from_request("checked", "txt2img", body, safety_checker=True),
            studio.registry,
            models_root=studio.settings.models_dir,
        )
        _, job_id = submit_preset_job(studio, presets, "checked", "cat", None, owner="tester", seed=3)
        status = studio.queue.wait(job_id, timeout=300)
        assert status.state == "done", status.error
        [path] = status.images
        with Image.open(path) as image:
            assert "Safety checker: held back" in image.info["parameters"]
            assert np.asarray(image.convert("RGB")).max() == 0
        from app.safety_checker import screen_files

        assert screen_files(studio.settings.models_dir, [path]) == [True]  # front ends read the mark
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_img2img_preset_upscales_its_picture(studio, presets) -> None:
    """A photo preset's upscale: the same request fields as img2img's (``upscaler``, ``upscale_by``)."""
    body = {
        "prompt": "a {prompt}",
        "steps": 2,
        "sampler_name": "Euler",
        "denoising_strength": 0.5,
        "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
        "upscaler": "Lanczos",
        "upscale_by": 2,
    }
    path = presets.save(
        preset_from_request("big", "img2img", body, longest_side=64),
        studio.registry,
        models_root=studio.settings.models_dir,
    )
    assert "upscale_by: 2" in path.read_text(encoding="utf-8")
    queue = studio.start_queue()
    _, job_id = submit_preset_job(
        studio, presets, "big", "cat", phone_photo("PNG", rotated=False), owner="t", seed=5
    )
    status = queue.wait(job_id, timeout=300)
    assert status.state == "done", status.error
    with Image.open(status.images[0]) as image:
        width, height = image.size
        assert max(width, height) == 128  # the photo fitted to 64, then upscaled 2x
        assert "Postprocess upscale by: 2" in image.info["parameters"]
