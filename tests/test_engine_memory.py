"""Memory presets as the engine applies them, and the out-of-memory retry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from contract.images import Txt2ImgRequest
from pipelines.errors import OutOfMemoryError
from pipelines.generation.engine import EngineConfig, ImageEngine

SMALL = {"width": 64, "height": 64, "steps": 2, "prompt": "x"}


def engine_with(studio: Any, tmp_path: Path, preset: str, **overrides: Any) -> ImageEngine:
    config = EngineConfig(outputs_root=tmp_path / "out", memory_preset=preset, memory_overrides=overrides)
    return ImageEngine(studio.models, config)


def fail_first_calls(monkeypatch: pytest.MonkeyPatch, pipe: Any, failures: int) -> list[int]:
    calls: list[int] = []
    original = type(pipe).__call__

    def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", flaky)
    return calls


def test_out_of_memory_retries_once_with_lower_preset(studio, tmp_path: Path, monkeypatch) -> None:
    engine = engine_with(studio, tmp_path, "high")
    loaded = studio.models.load("tiny-sd1")
    calls = fail_first_calls(monkeypatch, loaded.pipe, failures=1)
    result = engine.txt2img(Txt2ImgRequest(**SMALL, override_settings={"sd_model_checkpoint": "tiny-sd1"}))
    assert len(calls) == 2
    assert result.images
    assert any("retrying once with 'medvram'" in note for note in result.notes)


def test_out_of_memory_twice_is_a_clear_error(studio, tmp_path: Path, monkeypatch) -> None:
    engine = engine_with(studio, tmp_path, "high")
    loaded = studio.models.load("tiny-sd1")
    fail_first_calls(monkeypatch, loaded.pipe, failures=5)
    with pytest.raises(OutOfMemoryError, match="--lowvram"):
        engine.txt2img(Txt2ImgRequest(**SMALL, override_settings={"sd_model_checkpoint": "tiny-sd1"}))
    assert not list((tmp_path / "out").rglob("*.png"))


def test_auto_preset_on_cpu_and_flag_overrides(studio, tmp_path: Path) -> None:
    engine = engine_with(studio, tmp_path, "auto", no_half_vae=True, channels_last=True)
    name, options = engine.memory_options(family="sd1")
    assert name == "cpu"  # no CUDA on this machine
    assert options.no_half_vae and options.channels_last
    with pytest.raises(ValueError, match="attention"):
        engine_with(studio, tmp_path, "high", attention="warp-drive").memory_options()


def test_vram_sizes_pick_presets() -> None:
    from pipelines.generation.memory import preset_for_vram

    gib = 2**30
    assert preset_for_vram(24 * gib, "sdxl") == "high"
    assert preset_for_vram(8 * gib, "sdxl") == "medvram"
    assert preset_for_vram(4 * gib, "sd1") == "medvram"
    assert preset_for_vram(2 * gib, "sd1") == "lowvram"
    assert preset_for_vram(None, "sd1") == "cpu"
