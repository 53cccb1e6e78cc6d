"""Speed options (issue 13): step caching, token merging, fp8 UNet weights, group offload, TAESD
decode. Each one is checked to really change what it should, to be recorded in the infotext, and to
restore plain diffusers' result exactly when it is off. No timing is asserted (see bench/)."""

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

from contract.images import Img2ImgRequest, Txt2ImgRequest, format_validation_error
from pipelines.generation.engine import EngineConfig, ImageEngine
from pipelines.generation.speedups import (
    JobSpeedups,
    SpeedOptions,
    SpeedStats,
    deep_blocks,
    merged_attention_layers,
)
from pipelines.outputs.infotext import infotext_to_request_fields, parse_infotext
from pipelines.outputs.saving import read_png_parameters

SMALL = {"width": 64, "height": 64, "steps": 6, "prompt": "a red house", "seed": 3, "sampler_name": "Euler"}


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"), dtype=np.int16)


def engine_for(studio: Any, tmp_path: Path, **config: Any) -> ImageEngine:
    return ImageEngine(
        studio.models, EngineConfig(outputs_root=tmp_path / "out", memory_preset="cpu", **config)
    )


def render(pipe: Any, steps: int = 2) -> np.ndarray:
    """One seeded 64 px image straight from a diffusers pipeline."""
    return pipe(
        "a cat",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        height=64,
        width=64,
    ).images[0]


class CallCounter:
    """Counts forward calls of a module's first sub-layer (the block itself may be skipped)."""

    def __init__(self, module: torch.nn.Module) -> None:
        layer = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
        self.calls = 0
        self.handle = layer.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


def test_options_off_keep_plain_results_bit_exact(studio, tmp_path: Path) -> None:
    engine = engine_for(studio, tmp_path)
    plain = engine.txt2img(Txt2ImgRequest(**SMALL))
    off = engine.txt2img(
        Txt2ImgRequest(**SMALL, cache_interval=1, token_merging_ratio=0.0, fast_decode=False)
    )
    assert np.array_equal(pixels(plain.images[0].path), pixels(off.images[0].path))
    for key in ("Cache interval", "Token merging ratio", "VAE decode"):
        assert key not in off.images[0].infotext
    unet = studio.models.load("tiny-sd1").pipe.unet
    assert not getattr(unet, "_diffusers_hook", None) or not unet._diffusers_hook.hooks


def test_step_caching_skips_deep_blocks_and_is_recorded(studio, tmp_path: Path) -> None:
    engine = engine_for(studio, tmp_path)
    unet = studio.models.load("tiny-sd1").pipe.unet
    plain = engine.txt2img(Txt2ImgRequest(**SMALL))
    shallow, deep = CallCounter(unet.up_blocks[-1]), CallCounter(unet.mid_block)
    cached = engine.txt2img(Txt2ImgRequest(**SMALL, cache_interval=3))
    shallow.handle.remove()
    deep.handle.remove()
    assert shallow.calls == 6, "the shallow path runs at every step"
    assert deep.calls == 2, "the deep blocks run at steps 1 and 4 only"
    assert any("4 of 6 UNet calls reused" in note for note in cached.notes)
    ours, theirs = pixels(cached.images[0].path), pixels(plain.images[0].path)
    assert not np.array_equal(ours, theirs)
    assert np.abs(ours - theirs).mean() < 40, "cached features stay close to the full computation"
    info = parse_infotext(read_png_parameters(cached.images[0].path))
    assert info.params["Cache interval"] == "3"
    assert infotext_to_request_fields(info)["cache_interval"] == 3
    # hooks are gone after the job: the next plain job equals the first
    again = engine.txt2img(Txt2ImgRequest(**SMALL))
    assert np.array_equal(pixels(again.images[0].path), theirs)


def test_token_merging_merges_tokens_and_is_recorded(studio, tmp_path: Path) -> None:
    engine = engine_for(studio, tmp_path)
    plain = engine.txt2img(Txt2ImgRequest(**SMALL))
    merged = engine.txt2img(Txt2ImgRequest(**SMALL, override_settings={"token_merging_ratio": 0.5}))
    note = next(note for note in merged.notes if note.startswith("token merging"))
    assert not note.startswith("token merging: 0 tokens")
    ours, theirs = pixels(merged.images[0].path), pixels(plain.images[0].path)
    assert not np.array_equal(ours, theirs)
    assert np.abs(ours - theirs).mean() < 40
    fields = infotext_to_request_fields(parse_infotext(merged.images[0].infotext))
    assert fields["token_merging_ratio"] == 0.5
    processors = {type(p).__name__ for p in studio.models.load("tiny-sd1").pipe.unet.attn_processors.values()}
    assert "TokenMergingProcessor" not in processors


def test_merge_and_unmerge_are_inverse_on_kept_tokens() -> None:
    from pipelines.generation.speedups import _merge_plan

    x = torch.randn(2, 64, 8)
    merge, unmerge, removed = _merge_plan(x, (8, 8), 32, torch.Generator().manual_seed(0))
    merged = merge(x)
    assert merged.shape == (2, 64 - 32, 8) and removed == 32
    restored = unmerge(merged)
    assert restored.shape == x.shape
    # 16 targets (one per 2x2 cell), 48 candidates of which 32 merged: the 16 kept come back unchanged,
    # and every token comes back as one of the merged tokens
    same = (restored == x).all(dim=-1)
    assert (same.sum(dim=1) >= 16).all()
    for batch in range(2):
        assert all(any(torch.equal(token, m) for m in merged[batch]) for token in restored[batch])
    untouched, unmerge_nothing, _ = _merge_plan(x, (8, 8), 0, torch.Generator().manual_seed(0))
    assert torch.equal(unmerge_nothing(untouched(x)), x)


@pytest.mark.parametrize("checkpoint", ["tiny-sdxl", "tiny-sd1-inpaint"])
def test_both_options_on_sdxl_and_inpainting_models(studio, tmp_path: Path, checkpoint: str) -> None:
    engine = engine_for(studio, tmp_path)
    request = dict(SMALL, override_settings={"sd_model_checkpoint": checkpoint})
    plain = engine.txt2img(Txt2ImgRequest(**request))
    fast = engine.txt2img(Txt2ImgRequest(**request, cache_interval=2, token_merging_ratio=0.5))
    assert any("3 of 6 UNet calls reused" in note for note in fast.notes)
    assert any(
        note.startswith("token merging") and not note.startswith("token merging: 0 ") for note in fast.notes
    )
    assert not np.array_equal(pixels(plain.images[0].path), pixels(fast.images[0].path))
    assert "Cache interval: 2" in fast.images[0].infotext


def test_img2img_inpaint_and_hires_with_step_caching(studio, tmp_path: Path) -> None:
    engine = engine_for(studio, tmp_path)
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (16, 16, 48, 48))
    mask_image.save(mask)
    inpaint = engine.img2img(
        Img2ImgRequest(
            **SMALL, init_images=[str(source)], mask=str(mask), denoising_strength=1.0, cache_interval=3
        )
    )
    assert any("4 of 6 UNet calls reused" in note for note in inpaint.notes)
    hires = engine.txt2img(
        Txt2ImgRequest(
            **SMALL,
            enable_hr=True,
            hr_scale=1.5,
            denoising_strength=0.5,
            cache_interval=2,
            token_merging_ratio=0.3,
        )
    )
    # first pass 6 calls (3 cached); the hires pass starts a new run: 3 calls (1 cached)
    assert any("4 of 9 UNet calls reused" in note for note in hires.notes), hires.notes
    assert Image.open(hires.images[0].path).size == (96, 96)


def test_controlnet_pipeline_with_step_caching_and_token_merging() -> None:
    from diffusers import DDIMScheduler

    from pipelines.controlnet.apply import build_controlnet_pipeline
    from tests.test_controlnet import tiny_controlnet
    from tests.tiny_models import tiny_pipeline

    pipe = tiny_pipeline("sd1", seed=0)
    runner = build_controlnet_pipeline(pipe, tiny_controlnet(pipe, seed=1))
    runner.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    runner.set_progress_bar_config(disable=True)
    control = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def run() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return runner(
            "a house",
            image=control,
            num_inference_steps=4,
            generator=generator,
            output_type="np",
            height=64,
            width=64,
        ).images[0]

    plain = run()
    speed = JobSpeedups(SpeedOptions(cache_interval=2, token_merging_ratio=0.5))
    with speed.attached(pipe.unet):
        fast = run()
    assert speed.stats.cached_calls == 2 and speed.stats.full_calls == 2
    assert speed.stats.merged_attention_calls > 0
    assert not np.array_equal(plain, fast) and np.isfinite(fast).all()
    assert np.array_equal(run(), plain), "detached: plain ControlNet results again"


def test_deep_blocks_and_merged_layers_cover_the_right_levels() -> None:
    from tests.tiny_models import tiny_pipeline

    unet = tiny_pipeline("sdxl", seed=0).unet
    blocks = deep_blocks(unet)
    assert unet.down_blocks[0] not in blocks and unet.up_blocks[-1] not in blocks
    assert unet.mid_block in blocks
    layers = merged_attention_layers(unet)
    assert layers and all(layer.is_cross_attention is False for layer in layers)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cache_interval": 0}, "cache_interval"),
        ({"cache_interval": 11}, "cache_interval"),
        ({"token_merging_ratio": 0.95}, "token_merging_ratio"),
        ({"override_settings": {"cache_interval": "often"}}, "override_settings.cache_interval"),
        ({"override_settings": {"cache_interval": True}}, "override_settings.cache_interval"),
        ({"override_settings": {"token_merging_ratio": -0.1}}, "override_settings.token_merging_ratio"),
    ],
)
def test_out_of_range_options_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Txt2ImgRequest(prompt="x", **fields)
    assert message in format_validation_error(caught.value)


def test_request_field_wins_over_override_settings_and_studio_default(studio, tmp_path: Path) -> None:
    request = Txt2ImgRequest(prompt="x", cache_interval=2, override_settings={"cache_interval": 4})
    assert request.speed_settings() == {"cache_interval": 2}
    engine = engine_for(studio, tmp_path, speed_defaults={"cache_interval": 3, "token_merging_ratio": 0.25})
    result = engine.txt2img(Txt2ImgRequest(**SMALL))
    assert "Cache interval: 3" in result.images[0].infotext
    assert "Token merging ratio: 0.25" in result.images[0].infotext


def test_fast_decode_uses_taesd_when_present_and_says_when_not(studio, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    from pipelines.generation.previews import LatentPreviewer

    engine = engine_for(studio, tmp_path)
    missing = engine.txt2img(Txt2ImgRequest(**SMALL, fast_decode=True))
    assert any("fast_decode: no TAESD weights" in note for note in missing.notes)
    assert "VAE decode" not in missing.images[0].infotext

    folder = tmp_path / "VAE-approx"
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        upsampling_scaling_factor=2,
    ).save_pretrained(folder / "taesd")
    engine._fast_decoders = LatentPreviewer(folder)
    plain = engine.txt2img(Txt2ImgRequest(**SMALL))
    fast = engine.txt2img(Txt2ImgRequest(**SMALL, fast_decode=True))
    assert "VAE decode: TAESD" in fast.images[0].infotext
    assert not np.array_equal(pixels(fast.images[0].path), pixels(plain.images[0].path))
    assert infotext_to_request_fields(parse_infotext(fast.images[0].infotext))["fast_decode"] is True


def test_fp8_unet_stores_float8_and_stays_close(tmp_path: Path) -> None:
    from pipelines.generation.memory import MemoryOptions, apply_memory_options, unet_weights_in_fp8
    from tests.tiny_models import tiny_pipeline

    reference = tiny_pipeline("sd1", seed=0)
    pipe = tiny_pipeline("sd1", seed=0)
    fp32_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    lines = apply_memory_options(
        pipe, MemoryOptions(device="cpu", dtype="fp32", fp8_unet=True), torch.device("cpu")
    )
    assert any(line.startswith("fp8_unet: UNet weights stored in float8_e4m3fn") for line in lines)
    assert unet_weights_in_fp8(pipe.unet) and pipe.unet.dtype == torch.float32  # compute dtype
    params = list(pipe.unet.parameters())
    fp8 = [p for p in params if p.dtype == torch.float8_e4m3fn]
    assert sum(p.numel() for p in fp8) / sum(p.numel() for p in params) > 0.9
    stored = sum(p.numel() * p.element_size() for p in params)
    assert stored / (fp32_bytes / 2) <= 0.55, "about half of what float16 weights would take"
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    # applying again (a derived pipeline, the OOM retry) does not stack a second cast
    apply_memory_options(pipe, MemoryOptions(device="cpu", dtype="fp32", fp8_unet=True), torch.device("cpu"))

    ours, theirs = render(pipe), render(reference)
    assert not np.array_equal(ours, theirs)
    assert np.abs(ours - theirs).mean() < 0.1


def test_fp8_unet_is_recorded_in_the_infotext(studio, tiny_models_root: Path, tmp_path: Path) -> None:
    from pipelines.models.model_manager import ModelManager

    models = ModelManager(studio.models.registry, max_loaded=1, default_checkpoint="tiny-sd1")
    engine = ImageEngine(
        models,
        EngineConfig(outputs_root=tmp_path / "out", memory_preset="cpu", memory_overrides={"fp8_unet": True}),
    )
    result = engine.txt2img(Txt2ImgRequest(**SMALL))
    assert "UNet weights: fp8 e4m3fn" in result.images[0].infotext
    assert models.current.pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    models.unload_all()


def test_lowvram_is_group_offload_and_the_old_path_stays_selectable(monkeypatch: pytest.MonkeyPatch) -> None:
    from unittest import mock

    from pipelines.generation import memory
    from tests.tiny_models import tiny_pipeline

    assert memory.MEMORY_PRESETS["lowvram"].offload == "group"
    assert memory.MEMORY_PRESETS["lowvram-sequential"].offload == "sequential"
    assert memory.lower_memory_preset("lowvram") == "lowvram-sequential"
    pipe = tiny_pipeline("sd1", seed=0)
    applied: dict[str, dict[str, Any]] = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            record = mock.MagicMock(name=f"{name}.enable_group_offload")
            record.side_effect = lambda _name=name, **kwargs: applied.__setitem__(_name, kwargs)
            monkeypatch.setattr(module, "enable_group_offload", record, raising=False)
    monkeypatch.setattr(memory, "_group_offloaded", lambda module: False)
    pipe.to = mock.MagicMock(name="to")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    line = memory._apply_placement(pipe, memory.MEMORY_PRESETS["lowvram"], torch.device("cuda"))
    assert line.startswith("offload: block-level group offloading to cuda")
    assert set(applied) == {"unet", "vae", "text_encoder"}
    assert all(kwargs["offload_type"] == "block_level" for kwargs in applied.values())
    assert applied["unet"]["use_stream"] and applied["text_encoder"]["use_stream"]
    # a stream onloads from copies taken now: the VAE's float32 upcast decode would be undone
    assert applied["vae"]["use_stream"] is False
    pipe.to.assert_not_called()
    cpu_line = memory._apply_placement(pipe, memory.MEMORY_PRESETS["lowvram"], torch.device("cpu"))
    assert "not applied (group offloading needs a CUDA GPU" in cpu_line


def test_the_oom_fallback_chain_switches_offloading_on_the_loaded_pipeline() -> None:
    """The OOM retry lowers the preset of the pipeline already loaded: medvram (accelerate's model
    offload) -> lowvram (diffusers' group offloading) -> lowvram-sequential; diffusers refuses to
    stack those, so each switch takes the previous one off. Run here with the CPU as the "GPU".
    (accelerate cannot run sequential offload with the CPU as its execution device, so that one is
    switched to and away from without a generation in between.)"""
    from pipelines.generation.memory import MEMORY_PRESETS, _group_offloaded, place_with_offload
    from tests.tiny_models import tiny_pipeline

    cpu = torch.device("cpu")
    pipe = tiny_pipeline("sd1", seed=0)

    plain = render(pipe)
    chain = [MEMORY_PRESETS[name].offload for name in ("medvram", "lowvram", "lowvram-sequential")]
    assert chain == ["model", "group", "sequential"]
    for offload in [*chain, "group", "model", "none"]:
        line = place_with_offload(pipe, offload, cpu)
        assert line.startswith("offload:"), line
        grouped = any(_group_offloaded(m) for m in pipe.components.values())
        hooked = any(hasattr(m, "_hf_hook") for m in pipe.components.values())
        assert grouped == (offload == "group") and hooked == (offload in ("model", "sequential")), offload
        if offload != "sequential":
            assert np.array_equal(render(pipe), plain), offload


def test_speed_options_compose_with_lowvram_group_offload_and_fp8() -> None:
    """``lowvram`` is diffusers' group offloading with CUDA streams, whose first UNet forward traces
    the block order through hooks that then remove themselves. The group offloading runs here on the
    CPU (no streams on this machine) with diffusers' own tracer hook added as streams would add it;
    step caching + token merging + fp8 must give the first job after load the same image as later
    jobs and as a pipeline without offloading, and leave no tracer behind."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import LazyPrefetchGroupOffloadingHook, apply_group_offloading

    from pipelines.generation.memory import MemoryOptions, apply_memory_options
    from pipelines.generation.speedups import OFFLOAD_TRACE_HOOK, offload_trace_pending
    from tests.tiny_models import tiny_pipeline

    cpu = torch.device("cpu")
    reference, pipe = tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=0)
    for each in (reference, pipe):
        apply_memory_options(each, MemoryOptions(device="cpu", dtype="fp32", fp8_unet=True), cpu)
    apply_group_offloading(
        pipe.unet, onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )
    tracer = LazyPrefetchGroupOffloadingHook()
    HookRegistry.check_if_exists_or_initialize(pipe.unet).register_hook(tracer, OFFLOAD_TRACE_HOOK)
    assert offload_trace_pending(pipe.unet)

    def job(p: Any) -> tuple[np.ndarray, SpeedStats, int]:
        deep = CallCounter(p.unet.down_blocks[1])
        speed = JobSpeedups(SpeedOptions(cache_interval=3, token_merging_ratio=0.5))
        with speed.attached(p.unet):
            image = render(p, steps=6)
        deep.handle.remove()
        return image, speed.stats, deep.calls

    expected, expected_stats, expected_calls = job(reference)
    assert expected_stats.cached_calls > 0 and expected_stats.merged_attention_calls > 0
    for attempt in ("first job, tracing", "second job"):
        image, stats, calls = job(pipe)
        assert np.array_equal(image, expected), attempt
        assert (stats.cached_calls, stats.full_calls, calls) == (
            expected_stats.cached_calls,
            expected_stats.full_calls,
            expected_calls,
        ), f"{attempt}: the deep blocks are skipped on cached calls"
        assert not offload_trace_pending(pipe.unet)
    traced = len(tracer.execution_order)
    assert traced > 0
    job(pipe)
    assert len(tracer.execution_order) == traced, "no tracer hook left on the blocks"
    assert all(
        set(block._diffusers_hook.hooks) == {"group_offloading"}
        for block in (*pipe.unet.down_blocks, *pipe.unet.up_blocks)
    )


def test_launch_flags_and_settings_reach_the_engine(tmp_path: Path) -> None:
    import launch
    from app.settings import StudioSettings

    args = launch.studio_flags().parse_args(["--fp8-unet", "--lowvram-sequential"])
    overrides = launch.settings_overrides(args)
    assert overrides["fp8_unet"] is True and overrides["memory_preset"] == "lowvram-sequential"
    settings = StudioSettings(data_dir=tmp_path, fp8_unet=True, cache_interval=3)
    assert settings.memory_overrides()["fp8_unet"] is True
    assert settings.speed_defaults()["cache_interval"] == 3


def as_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_gpu_check_runs_in_its_cpu_smoke_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gpu_check

    gpu_check.main(["--smoke", "--skip", "talk"])
    out = capsys.readouterr().out
    assert "[1] SD1.5 64x64" in out and "[4] memory presets: skipped" in out
    assert "gpu_check finished" in out
