"""The shared generation controls (request fields <-> components, infotext paste) and the
Settings tab's save-and-apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.ui.generation_controls import GenerationControls, field_range
from contract.images import Img2ImgRequest, Txt2ImgRequest
from pipelines.outputs.infotext import infotext_to_request_fields, parse_infotext

NAMES = [
    "checkpoint",
    "vae",
    "refresh_models",
    "prompt",
    "negative_prompt",
    "styles",
    "sampler_name",
    "scheduler",
    "steps",
    "width",
    "height",
    "cfg_scale",
    "seed",
    "random_seed",
    "reuse_seed",
    "extra_seed",
    "subseed",
    "subseed_strength",
    "n_iter",
    "batch_size",
    "clip_skip",
]


def _controls() -> GenerationControls:
    """Controls whose "components" are their names: the logic only uses them as dict keys."""
    return GenerationControls(prefix="t", **{name: name for name in NAMES})


def test_slider_ranges_come_from_the_request_models() -> None:
    assert field_range(Txt2ImgRequest, "steps") == {"minimum": 1, "maximum": 150}
    assert field_range(Txt2ImgRequest, "width") == {"minimum": 64, "maximum": 8192}
    assert field_range(Img2ImgRequest, "denoising_strength") == {"minimum": 0.0, "maximum": 1.0}


def test_request_values_build_a_request() -> None:
    controls = _controls()
    data = {
        "prompt": "a cat",
        "negative_prompt": "",
        "styles": ["sharp"],
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "steps": 20.0,
        "width": 512,
        "height": 768,
        "cfg_scale": 7.5,
        "seed": 42.0,
        "subseed": 7,
        "subseed_strength": 0.3,
        "extra_seed": False,
        "n_iter": 2,
        "batch_size": 1,
        "clip_skip": 2,
        "checkpoint": "tiny-sd1.safetensors",
        "vae": "Automatic",
    }
    request = Txt2ImgRequest(**controls.request_values(data))
    assert (request.steps, request.seed, request.subseed_strength) == (20, 42, 0.0)  # "Extra" is off
    assert request.override_settings == {"sd_model_checkpoint": "tiny-sd1.safetensors"}
    assert request.styles == ["sharp"] and request.clip_skip == 2
    data["extra_seed"] = True
    assert Txt2ImgRequest(**controls.request_values(data)).subseed_strength == 0.3


def test_paste_fills_every_control_the_infotext_names(studio) -> None:
    text = (
        "a castle\nNegative prompt: fog\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 99, "
        "Size: 640x448, Model: tiny-sd1, Variation seed: 5, Variation seed strength: 0.2, Clip skip: 2"
    )
    controls = _controls()
    updates, notes = controls.paste(studio, infotext_to_request_fields(parse_infotext(text)))
    values = {component: update["value"] for component, update in updates.items()}
    assert values["prompt"] == "a castle" and values["negative_prompt"] == "fog"
    assert (values["steps"], values["cfg_scale"], values["seed"]) == (30, 6.5, 99)
    assert (values["width"], values["height"]) == (640, 448)
    assert (values["sampler_name"], values["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (values["subseed"], values["subseed_strength"], values["extra_seed"]) == (5, 0.2, True)
    assert values["clip_skip"] == 2
    assert values["checkpoint"] == "tiny-sd1.safetensors" and notes == []

    _, notes = controls.paste(studio, {"override_settings": {"sd_model_checkpoint": "missing-model"}})
    assert notes == [
        "Model 'missing-model' from the parameters is not in the models folder; kept the current one."
    ]


@pytest.fixture
def fresh_services(tmp_path: Path):
    from app.services import StudioServices
    from app.settings import StudioSettings

    settings = StudioSettings(
        models_dir=tmp_path / "models",
        data_dir=tmp_path / "data",
        outputs_dir=tmp_path / "out",
        port=9999,
        in_process_workers=True,  # the worker's engine is this process's: its new config can be read
        device_ids=["cpu"],
    )
    return StudioServices.create(settings)


def _changes(services, **overrides):
    settings = services.settings
    values = {
        "memory_preset": settings.memory_preset,
        "attention": settings.attention,
        "default_sampler": settings.default_sampler,
        "default_scheduler": settings.default_scheduler,
        "live_preview": settings.live_preview,
        "live_preview_every": settings.live_preview_every,
        "outputs_dir": str(settings.outputs_dir),
        "checkpoints_in_ram": settings.checkpoints_in_ram,
    }
    return {**values, **overrides}


def test_settings_are_saved_and_applied_without_restart(fresh_services) -> None:
    from app.ui.settings_tab import apply_settings

    lines = apply_settings(
        fresh_services,
        _changes(
            fresh_services,
            memory_preset="lowvram",
            attention="sdpa",
            default_sampler="dpm++ 2m",
            default_scheduler="karras",
            live_preview="none",
            checkpoints_in_ram=3,
        ),
    )
    assert fresh_services.engine.config.memory_preset == "lowvram"
    assert fresh_services.engine.config.memory_overrides["attention"] == "sdpa"
    assert fresh_services.models.max_loaded == 3
    assert (fresh_services.settings.default_sampler, fresh_services.settings.default_scheduler) == (
        "DPM++ 2M",
        "Karras",
    )
    saved = json.loads(fresh_services.settings.config_file.read_text())
    assert saved["memory_preset"] == "lowvram" and saved["live_preview"] == "none"
    assert "port" not in saved  # flags of this run are not made permanent
    assert any("next job" in line for line in lines)


def test_bad_settings_change_nothing(fresh_services) -> None:
    from app.ui.settings_tab import apply_settings

    with pytest.raises(ValueError, match="Schedule type 'Karras' is not available for 'DDIM'"):
        apply_settings(
            fresh_services, _changes(fresh_services, default_sampler="DDIM", default_scheduler="Karras")
        )
    with pytest.raises(ValueError, match="live_preview_every"):
        apply_settings(fresh_services, _changes(fresh_services, memory_preset="cpu", live_preview_every=0))
    assert fresh_services.settings.memory_preset == "auto"
    assert not fresh_services.settings.config_file.exists()


def test_batch_from_directory_reads_only_inside_the_outputs_folder(tmp_path: Path) -> None:
    from PIL import Image

    from app.ui.extras_tab import folder_images

    outputs = tmp_path / "outputs"
    (outputs / "batch-input").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(outputs / "batch-input" / "a.png")
    (tmp_path / "private").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "private" / "b.png")
    assert [p.name for p in folder_images("batch-input", outputs)] == ["a.png"]
    assert [p.name for p in folder_images(str(outputs / "batch-input"), outputs)] == ["a.png"]
    for outside in (str(tmp_path / "private"), "../private", "/etc"):
        with pytest.raises(ValueError, match="inside the outputs folder"):
            folder_images(outside, outputs)


def test_output_folder_is_fixed_from_the_page_when_serving_a_network(fresh_services, tmp_path: Path) -> None:
    from app.ui.settings_tab import apply_settings

    fresh_services.settings.listen = True
    with pytest.raises(ValueError, match="--listen"):
        apply_settings(fresh_services, _changes(fresh_services, outputs_dir=str(tmp_path / "elsewhere")))
    assert apply_settings(fresh_services, _changes(fresh_services, live_preview="none"))  # others still work
    assert fresh_services.settings.outputs_dir == tmp_path / "out"
