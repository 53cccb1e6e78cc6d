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
    # the next job starts where the retry finished instead of running out of memory again
    again = engine.txt2img(Txt2ImgRequest(**SMALL, override_settings={"sd_model_checkpoint": "tiny-sd1"}))
    assert len(calls) == 3
    assert any(note.startswith("memory preset: medvram (an earlier job ran out") for note in again.notes)
    assert not any("retrying" in note for note in again.notes)


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


# --- offloading really applied, with the CPU standing in for the GPU ---------------------------
SIX_STEPS = {**SMALL, "steps": 6, "sampler_name": "Euler", "seed": 5, "cache_interval": 3}


@pytest.fixture
def offload_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presets place pipelines as on a GPU: accelerate's model offload and diffusers' group
    offloading both run with the CPU as their device (accelerate's sequential offload cannot, so
    ``lowvram-sequential`` is not used here)."""
    from pipelines.generation import memory

    def placement(pipe: Any, options: Any, device: torch.device) -> str:
        return memory.place_with_offload(pipe, options.offload, device)

    monkeypatch.setattr(memory, "_apply_placement", placement)


def merged_tokens(note: str) -> bool:
    return note.startswith("token merging: ") and not note.startswith("token merging: 0 tokens")


def own_engine(studio: Any, tmp_path: Path, preset: str) -> ImageEngine:
    """An engine with its own model manager: offload hooks must not reach the shared pipelines."""
    from pipelines.models.model_manager import ModelManager

    models = ModelManager(studio.models.registry, max_loaded=1, default_checkpoint="tiny-sd1")
    return ImageEngine(models, EngineConfig(outputs_root=tmp_path / "out", memory_preset=preset))


def test_speed_options_keep_working_job_after_job_under_model_offload(
    studio, tmp_path: Path, offload_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """medvram: accelerate swaps ``unet.forward`` around every pipeline call; step caching and
    token merging must neither drop its hook (on a GPU: weights left on the CPU in the 2nd job)
    nor be dropped by it."""
    import numpy as np
    from accelerate.hooks import CpuOffload
    from PIL import Image

    engine = own_engine(studio, tmp_path, "medvram")
    onloads: list[str] = []
    original = CpuOffload.pre_forward

    def counted(self: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
        onloads.append(type(module).__name__)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", counted)
    images = []
    try:
        for _ in range(3):
            onloads.clear()
            result = engine.txt2img(Txt2ImgRequest(**SIX_STEPS, token_merging_ratio=0.5))
            assert onloads.count("UNet2DConditionModel") == 6, "accelerate's hook sees every UNet call"
            assert any("4 of 6 UNet calls reused" in note for note in result.notes), result.notes
            assert any(merged_tokens(note) for note in result.notes), result.notes
            images.append(np.array(Image.open(result.images[0].path)))
        assert all(np.array_equal(image, images[0]) for image in images[1:])
    finally:
        engine.models.unload_all()


def test_oom_retry_into_lowvram_rewraps_speed_options(
    studio, tmp_path: Path, offload_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """medvram runs out of memory -> lowvram inside the same job: model offload is switched to group
    offloading and attention slicing comes in; token merging must wrap the sliced processors (and
    leave them installed after the job), step caching keep skipping."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from pipelines.generation.memory import _group_offloaded

    engine = own_engine(studio, tmp_path, "medvram")
    try:
        loaded = engine.models.load("tiny-sd1")
        fail_first_calls(monkeypatch, loaded.pipe, failures=1)
        result = engine.txt2img(Txt2ImgRequest(**SIX_STEPS, token_merging_ratio=0.5))
        assert any("retrying once with 'lowvram'" in note for note in result.notes), result.notes
        assert any("4 of 6 UNet calls reused" in note for note in result.notes), result.notes
        assert any(merged_tokens(note) for note in result.notes), result.notes
        pipe = loaded.pipe
        assert {type(p) for p in pipe.unet.attn_processors.values()} == {SlicedAttnProcessor}
        components = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        assert any(_group_offloaded(m) for m in components)
        assert not any(hasattr(m, "_hf_hook") for m in components), "model offload taken off"
    finally:
        engine.models.unload_all()


def test_speed_options_are_not_applied_to_a_compiled_unet(studio, tmp_path: Path) -> None:
    """CUDA graphs overwrite their outputs at every replay, so deep features kept by step caching
    would be lost: with ``--compile`` the job says so and records neither option."""
    engine = own_engine(studio, tmp_path, "cpu")
    try:
        unet = engine.models.load("tiny-sd1").pipe.unet
        unet._compiled_call_impl = unet._call_impl  # what Module.compile leaves (runs uncompiled here)
        result = engine.txt2img(Txt2ImgRequest(**SIX_STEPS, token_merging_ratio=0.5))
        assert "step caching and token merging: not applied (the UNet is compiled" in " ".join(result.notes)
        assert "Cache interval" not in result.images[0].infotext
        assert "Token merging ratio" not in result.images[0].infotext
    finally:
        engine.models.unload_all()


def test_oom_retry_redoes_only_the_unfinished_batches(
    studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 1 of 3 runs out of memory: batch 0 (already saved) is neither run nor saved again."""
    engine = engine_with(studio, tmp_path, "high")
    loaded = studio.models.load("tiny-sd1")
    calls: list[int] = []
    original = type(loaded.pipe).__call__

    def second_call_fails(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(loaded.pipe), "__call__", second_call_fails)
    request = Txt2ImgRequest(
        **SMALL, seed=40, n_iter=3, override_settings={"sd_model_checkpoint": "tiny-sd1"}
    )
    result = engine.txt2img(request)
    assert len(calls) == 4, "batch 0, batch 1 (out of memory), batch 1 again, batch 2"
    assert [image.seed for image in result.images] == [40, 41, 42]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 3
    assert any("retrying once with 'medvram'" in note for note in result.notes)


def test_worker_gpu_is_the_current_device_and_its_memory_picks_the_preset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker for cuda:1 makes it the thread's current device (plain "cuda" placements and memory
    stats then use it, not GPU 0); the auto preset reads that card's memory, times the fraction a
    shared GPU (--gpu-share) allows."""
    from types import SimpleNamespace

    from app.workers.runtime import select_cuda_device
    from pipelines.generation.engine import _total_vram

    gib = 2**30
    chosen: list[torch.device] = []
    cards = {0: 24 * gib, 1: 8 * gib}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=cards[i]))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 0.5 if i == 1 else 1.0)

    for device in ("cpu", "auto", "cuda"):
        select_cuda_device(device)
    assert chosen == []
    select_cuda_device("cuda:1")
    assert chosen == [torch.device("cuda:1")]
    assert _total_vram("cuda:1") == 4 * gib
    assert _total_vram(None) == 24 * gib
