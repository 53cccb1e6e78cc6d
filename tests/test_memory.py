"""Tests of pipelines.generation.memory: option wiring on a tiny random SD1.5 pipeline, on the CPU.

The CUDA paths are tested by faking ``torch.cuda.is_available()`` and replacing the diffusers
methods that would touch a GPU (offload, xFormers, ``pipe.to("cuda")``, ``torch.compile``) with
recorders, so each preset is checked to call exactly the diffusers methods it should.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from pydantic import ValidationError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipelines.generation import memory
from pipelines.generation.memory import (
    MEMORY_PRESETS,
    DeviceUnavailableError,
    MemoryOptions,
    apply_memory_options,
    decode_has_nan,
    free_accelerator_memory,
    is_out_of_memory,
    keep_vae_float32,
    lower_memory_preset,
    preset_for_vram,
    resolve_device,
    resolve_dtype,
)
from pipelines.prompts.tokenizer import build_clip_tokenizer
from tests.tiny_models import tiny_pipeline

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
GIB = 1024**3
OPTION_NAMES = list(MemoryOptions.model_fields)


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


@pytest.fixture
def pipe(tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """A tiny random SD1.5 pipeline (two-block UNet and VAE, two-layer CLIP text encoder)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    # sample_size=16 makes the VAE tile a 32x32 image, so vae_tiling really takes the tiled path.
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(autouse=True)
def restore_tf32_flags() -> Iterator[None]:
    """TF32 flags are process-wide; put them back so other tests see what they expect."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn


def generate(pipeline: StableDiffusionPipeline, images: int = 1) -> torch.Tensor:
    result = pipeline(
        "a red cube",
        num_inference_steps=2,
        height=32,
        width=32,
        num_images_per_prompt=images,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    )
    return result.images


def line_for(lines: list[str], option: str) -> str:
    matching = [line for line in lines if line.startswith(f"{option}: ")]
    assert len(matching) == 1, f"expected one line for {option!r} in {lines}"
    return matching[0]


def processor_kinds(model: Any) -> set[type]:
    return {type(processor) for processor in model.attn_processors.values()}


# --- CPU: CUDA-only options are logged as not applied; the pipeline still runs ------------------


@pytest.mark.parametrize(
    ("options", "option", "reason"),
    [
        (
            MemoryOptions(attention="xformers"),
            "attention",
            "xformers not applied (xFormers needs a CUDA GPU)",
        ),
        (MemoryOptions(offload="model"), "offload", "not applied (CPU offload needs a CUDA GPU"),
        (MemoryOptions(offload="sequential"), "offload", "not applied (CPU offload needs a CUDA GPU"),
        (MemoryOptions(compile=True), "compile", "not applied (mode='reduce-overhead' uses CUDA graphs"),
        (MemoryOptions(tf32=True), "tf32", "not applied (no CUDA device)"),
        (MemoryOptions(dtype="fp16"), "dtype", "float32 (fp16 requested"),
        (MemoryOptions(dtype="bf16"), "dtype", "float32 (bf16 requested; bf16 needs a CUDA GPU"),
    ],
)
def test_cuda_only_option_is_a_logged_no_op_on_cpu(
    pipe: StableDiffusionPipeline, options: MemoryOptions, option: str, reason: str
) -> None:
    lines = apply_memory_options(pipe, options, CPU)

    assert reason in line_for(lines, option)
    assert pipe.unet.dtype == torch.float32
    assert not hasattr(pipe.unet, "_hf_hook"), "no accelerate offload hook on the CPU"
    assert generate(pipe).shape == (1, 3, 32, 32)


def test_every_option_gets_exactly_one_log_line(pipe: StableDiffusionPipeline) -> None:
    everything = MemoryOptions(
        dtype="fp16",
        no_half_vae=True,
        attention="xformers",
        attention_slicing="max",
        vae_slicing=True,
        vae_tiling=True,
        offload="sequential",
        channels_last=True,
        compile=True,
    )
    lines = apply_memory_options(pipe, everything, CPU)

    for option in OPTION_NAMES:
        line_for(lines, option)
    assert len(lines) == len(OPTION_NAMES)
    assert generate(pipe).shape == (1, 3, 32, 32)


def test_cpu_preset_runs_in_float32(pipe: StableDiffusionPipeline) -> None:
    options = MEMORY_PRESETS["cpu"]
    device = resolve_device(options)

    lines = apply_memory_options(pipe, options, device)

    assert device == CPU
    assert line_for(lines, "offload") == "offload: none (pipeline moved to cpu)"
    assert processor_kinds(pipe.unet) == {AttnProcessor2_0}
    assert generate(pipe).dtype == torch.float32


# --- CPU: options that do apply without a GPU -------------------------------------------------


@pytest.mark.parametrize(("setting", "slice_size"), [(True, "auto"), ("max", "max")])
def test_attention_slicing_applies_on_cpu(
    pipe: StableDiffusionPipeline, setting: bool | str, slice_size: str
) -> None:
    spy = mock.MagicMock(wraps=pipe.enable_attention_slicing)
    pipe.enable_attention_slicing = spy

    lines = apply_memory_options(pipe, MemoryOptions(attention_slicing=setting), CPU)

    spy.assert_called_once_with(slice_size)
    assert line_for(lines, "attention_slicing").startswith("attention_slicing: on")
    assert processor_kinds(pipe.unet) == {SlicedAttnProcessor}
    assert generate(pipe).shape == (1, 3, 32, 32)


def test_attention_slicing_mode_uses_the_slice_size(pipe: StableDiffusionPipeline) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(attention="slicing", attention_slicing="max"), CPU)

    assert line_for(lines, "attention") == "attention: sliced attention (slice_size='max')"
    assert processor_kinds(pipe.unet) == {SlicedAttnProcessor}
    assert generate(pipe).shape == (1, 3, 32, 32)


def test_reapplying_sdpa_undoes_slicing(pipe: StableDiffusionPipeline) -> None:
    apply_memory_options(pipe, MemoryOptions(attention_slicing=True, vae_slicing=True), CPU)
    lines = apply_memory_options(pipe, MemoryOptions(attention="sdpa"), CPU)

    assert line_for(lines, "attention").startswith(
        "attention: PyTorch SDPA (AttnProcessor2_0) on unet and vae"
    )
    assert processor_kinds(pipe.unet) == {AttnProcessor2_0}
    assert processor_kinds(pipe.vae) == {AttnProcessor2_0}
    assert pipe.vae.use_slicing is False


def test_vae_slicing_applies_on_cpu(pipe: StableDiffusionPipeline) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(vae_slicing=True), CPU)

    assert line_for(lines, "vae_slicing").startswith("vae_slicing: on")
    assert pipe.vae.use_slicing is True
    assert generate(pipe, images=2).shape == (2, 3, 32, 32)


def test_vae_tiling_applies_on_cpu_and_decodes_in_tiles(pipe: StableDiffusionPipeline) -> None:
    tiled_decode = mock.MagicMock(wraps=pipe.vae.tiled_decode)
    pipe.vae.tiled_decode = tiled_decode

    lines = apply_memory_options(pipe, MemoryOptions(vae_tiling=True), CPU)
    image = generate(pipe)

    assert line_for(lines, "vae_tiling").startswith("vae_tiling: on")
    assert pipe.vae.use_tiling is True
    assert tiled_decode.called
    assert image.shape == (1, 3, 32, 32)
    assert not decode_has_nan(image)


def test_channels_last_applies_on_cpu(pipe: StableDiffusionPipeline) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(channels_last=True), CPU)

    assert line_for(lines, "channels_last").startswith("channels_last: UNet weights in channels-last")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert generate(pipe).shape == (1, 3, 32, 32)


def test_tf32_flags_are_set_from_options_every_time(pipe: StableDiffusionPipeline) -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    apply_memory_options(pipe, MemoryOptions(tf32=False), CPU)
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False

    apply_memory_options(pipe, MemoryOptions(tf32=True), CPU)
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.backends.cudnn.allow_tf32 is True


# --- Faked CUDA: each preset calls exactly the diffusers methods it should --------------------


class FakeCuda:
    """Records what apply_memory_options asks of the GPU-only diffusers methods."""

    def __init__(self, pipeline: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.moved_to: list[torch.device] = []
        real_to = pipeline.to

        def to_without_cuda(*args: Any, **kwargs: Any) -> StableDiffusionPipeline:
            """Apply dtype casts for real; record device moves instead of making them."""
            dtypes = [arg for arg in args if isinstance(arg, torch.dtype)]
            devices = [arg for arg in args if not isinstance(arg, torch.dtype)]
            if "device" in kwargs:
                devices.append(kwargs.pop("device"))
            self.moved_to.extend(torch.device(device) for device in devices)
            if dtypes or "dtype" in kwargs:
                real_to(*dtypes, **kwargs)
            return pipeline

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(memory, "_xformers_installed", lambda: False)
        monkeypatch.setattr(memory, "_triton_installed", lambda: False)
        self.model_offload = mock.MagicMock(name="enable_model_cpu_offload")
        self.sequential_offload = mock.MagicMock(name="enable_sequential_cpu_offload")
        self.xformers = mock.MagicMock(name="enable_xformers_memory_efficient_attention")
        self.attention_slicing = mock.MagicMock(wraps=pipeline.enable_attention_slicing)
        pipeline.to = to_without_cuda
        pipeline.enable_model_cpu_offload = self.model_offload
        pipeline.enable_sequential_cpu_offload = self.sequential_offload
        pipeline.enable_xformers_memory_efficient_attention = self.xformers
        pipeline.enable_attention_slicing = self.attention_slicing


@pytest.fixture
def fake_cuda(pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return FakeCuda(pipe, monkeypatch)


def test_high_preset_keeps_everything_on_the_gpu(pipe: StableDiffusionPipeline, fake_cuda: FakeCuda) -> None:
    options = MEMORY_PRESETS["high"]
    device = resolve_device(options)
    lines = apply_memory_options(pipe, options, device)

    assert device == CUDA
    assert fake_cuda.moved_to == [CUDA]
    fake_cuda.model_offload.assert_not_called()
    fake_cuda.sequential_offload.assert_not_called()
    fake_cuda.xformers.assert_not_called()
    fake_cuda.attention_slicing.assert_not_called()
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.dtype == torch.float16
    assert processor_kinds(pipe.unet) == {AttnProcessor2_0}
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (False, False)
    assert line_for(lines, "dtype") == "dtype: float16"
    assert line_for(lines, "tf32").startswith("tf32: on")
    assert line_for(lines, "offload") == "offload: none (pipeline moved to cuda)"


def test_medvram_preset_uses_model_offload_and_vae_slicing(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda
) -> None:
    lines = apply_memory_options(pipe, MEMORY_PRESETS["medvram"], CUDA)

    fake_cuda.model_offload.assert_called_once_with(device=CUDA)
    fake_cuda.sequential_offload.assert_not_called()
    fake_cuda.attention_slicing.assert_not_called()
    assert fake_cuda.moved_to == [], "offload replaces pipe.to(device)"
    assert pipe.unet.dtype == torch.float16
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (True, False)
    assert line_for(lines, "offload").startswith("offload: model CPU offload to cuda")


def test_lowvram_sequential_preset_uses_sequential_offload_slicing_and_tiling(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda
) -> None:
    lines = apply_memory_options(pipe, MEMORY_PRESETS["lowvram-sequential"], CUDA)

    fake_cuda.sequential_offload.assert_called_once_with(device=CUDA)
    fake_cuda.model_offload.assert_not_called()
    fake_cuda.attention_slicing.assert_called_once_with("auto")
    assert fake_cuda.moved_to == []
    assert processor_kinds(pipe.unet) == {SlicedAttnProcessor}
    assert (pipe.vae.use_slicing, pipe.vae.use_tiling) == (True, True)
    assert line_for(lines, "offload").startswith("offload: sequential CPU offload to cuda")


def test_offload_without_accelerate_falls_back_to_moving_the_pipeline(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_accelerate_installed", lambda: False)

    lines = apply_memory_options(pipe, MEMORY_PRESETS["medvram"], CUDA)

    fake_cuda.model_offload.assert_not_called()
    assert fake_cuda.moved_to == [CUDA]
    assert "not applied (CPU offload needs the accelerate package" in line_for(lines, "offload")


def test_auto_attention_uses_xformers_when_installed(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_xformers_installed", lambda: True)

    lines = apply_memory_options(pipe, MemoryOptions(), CUDA)

    fake_cuda.xformers.assert_called_once_with()
    assert line_for(lines, "attention") == "attention: auto: xFormers memory-efficient attention"


def test_broken_xformers_falls_back_to_sdpa(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_xformers_installed", lambda: True)
    fake_cuda.xformers.side_effect = ImportError("xformers was built for another PyTorch")

    lines = apply_memory_options(pipe, MemoryOptions(attention="xformers"), CUDA)

    line = line_for(lines, "attention")
    assert "xformers not applied (xFormers failed to start: xformers was built for another" in line
    assert "PyTorch SDPA" in line
    assert processor_kinds(pipe.unet) == {AttnProcessor2_0}


def test_xformers_not_installed_says_how_to_install(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda
) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(attention="xformers"), CUDA)

    fake_cuda.xformers.assert_not_called()
    assert "pip install -r requirements-xformers.txt" in line_for(lines, "attention")


def test_compile_wraps_the_unet_with_reduce_overhead(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_triton_installed", lambda: True)
    compile_calls: list[dict[str, Any]] = []

    def fake_compile(function: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        compile_calls.append(kwargs)
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)

    lines = apply_memory_options(pipe, MemoryOptions(compile=True), CUDA)
    again = apply_memory_options(pipe, MemoryOptions(compile=True), CUDA)

    assert compile_calls == [{"mode": "reduce-overhead"}]
    assert isinstance(pipe.unet, UNet2DConditionModel), "compiled in place, type and config kept"
    assert line_for(lines, "compile").startswith("compile: UNet compiled with mode='reduce-overhead'")
    assert line_for(again, "compile") == "compile: UNet already compiled"


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (MemoryOptions(compile=True, offload="model"), "offload='model' moves them"),
        (MemoryOptions(compile=True), "needs Triton"),
    ],
)
def test_compile_not_applied_when_it_cannot_work(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, options: MemoryOptions, reason: str
) -> None:
    line = line_for(apply_memory_options(pipe, options, CUDA), "compile")

    assert line.startswith("compile: not applied (")
    assert reason in line


def test_no_half_vae_keeps_the_vae_float32(pipe: StableDiffusionPipeline, fake_cuda: FakeCuda) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(dtype="fp16", no_half_vae=True), CUDA)

    assert pipe.unet.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
    assert pipe.vae.config.force_upcast is False
    assert line_for(lines, "no_half_vae").startswith("no_half_vae: VAE kept in float32")
    assert line_for(lines, "upcast_vae_on_nan").startswith("upcast_vae_on_nan: not needed")


def test_half_vae_mentions_force_upcast(pipe: StableDiffusionPipeline, fake_cuda: FakeCuda) -> None:
    lines = apply_memory_options(pipe, MemoryOptions(dtype="fp16"), CUDA)

    assert pipe.vae.dtype == torch.float16
    assert "force_upcast=True" in line_for(lines, "no_half_vae")
    assert line_for(lines, "upcast_vae_on_nan").startswith("upcast_vae_on_nan: on")


def test_half_unet_with_float32_vae_generates(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAE hooks make a float16 UNet + float32 VAE pipeline run end to end."""
    apply_memory_options(pipe, MemoryOptions(dtype="fp16", no_half_vae=True), CUDA)
    monkeypatch.undo()  # back to the real CPU: the float16 UNet runs on CPU kernels

    image = generate(pipe)

    assert image.shape == (1, 3, 32, 32)
    assert not decode_has_nan(image)


def test_sdxl_lowvram_with_float32_vae_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL: both text encoders are cast, the VAE stays float32 (force_upcast off) and it runs."""
    sdxl = tiny_pipeline("sdxl")
    fake_cuda = FakeCuda(sdxl, monkeypatch)
    options = MemoryOptions.model_validate(
        {**MEMORY_PRESETS["lowvram-sequential"].model_dump(), "no_half_vae": True}
    )

    lines = apply_memory_options(sdxl, options, CUDA)

    assert (sdxl.unet.dtype, sdxl.text_encoder.dtype, sdxl.text_encoder_2.dtype) == (torch.float16,) * 3
    assert sdxl.vae.dtype == torch.float32
    assert sdxl.vae.config.force_upcast is False
    assert line_for(lines, "no_half_vae").startswith("no_half_vae: VAE kept in float32")
    fake_cuda.sequential_offload.assert_called_once_with(device=CUDA)
    assert processor_kinds(sdxl.unet) == {SlicedAttnProcessor}
    monkeypatch.undo()  # back to the real CPU: the float16 UNet runs on CPU kernels
    image = sdxl(
        "a red cube",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 32, 32)
    assert not decode_has_nan(image)


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_bf16_only_where_the_gpu_supports_it(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)

    assert resolve_dtype(MemoryOptions(dtype="bf16"), CUDA) == expected


def test_cuda_index_beyond_visible_gpus_is_refused(fake_cuda: FakeCuda) -> None:
    assert resolve_device(MemoryOptions(device="cuda:0")) == torch.device("cuda:0")
    with pytest.raises(DeviceUnavailableError, match=r"device='cuda:1'.*only 1 CUDA GPU"):
        resolve_device(MemoryOptions(device="cuda:1"))


def test_free_accelerator_memory_empties_the_cuda_cache(
    fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_cache = mock.MagicMock()
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)

    free_accelerator_memory()

    empty_cache.assert_called_once_with()


# --- keep_vae_float32 -------------------------------------------------------------------------


def test_float32_vae_accepts_half_inputs_and_returns_half_latents(pipe: StableDiffusionPipeline) -> None:
    pipe.unet.to(torch.float16)
    half_latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).half()
    half_image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).half()
    with pytest.raises(RuntimeError):
        pipe.vae.decode(half_latents)  # why the hooks exist

    keep_vae_float32(pipe)
    keep_vae_float32(pipe)  # idempotent: replaces the earlier hooks

    decoded = pipe.vae.decode(half_latents).sample
    latents = pipe.vae.encode(half_image).latent_dist.sample(generator=torch.Generator().manual_seed(2))
    assert decoded.dtype == torch.float32
    assert latents.dtype == torch.float16
    assert len(pipe.vae._sd_studio_float32_hooks) == 5


# --- presets and VRAM thresholds --------------------------------------------------------------


def reported(nominal_gb: int) -> int:
    """What torch reports as total_memory for a card sold as ``nominal_gb`` (a little under)."""
    return nominal_gb * GIB - 200 * 1024**2


@pytest.mark.parametrize(
    ("family", "nominal_gb", "expected"),
    [
        ("sd15", 2, "lowvram"),
        ("sd15", 3, "lowvram"),
        ("sd15", 4, "medvram"),
        ("sd15", 6, "high"),
        ("sd15", 8, "high"),
        ("sd2", 4, "medvram"),
        ("SD1", 12, "high"),
        ("sdxl", 4, "lowvram"),
        ("sdxl", 6, "lowvram"),
        ("sdxl", 8, "medvram"),
        ("sdxl", 10, "medvram"),
        ("sdxl", 12, "high"),
        ("sdxl", 24, "high"),
        ("sdxl-refiner", 8, "medvram"),
    ],
)
def test_preset_for_vram_thresholds(family: str, nominal_gb: int, expected: str) -> None:
    assert preset_for_vram(reported(nominal_gb), family) == expected


def test_preset_for_vram_without_cuda_is_cpu() -> None:
    assert preset_for_vram(None, "sdxl") == "cpu"


def test_preset_for_vram_rejects_unknown_family_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"Unknown model family 'flux'.*sd15.*sdxl"):
        preset_for_vram(8 * GIB, "flux")
    with pytest.raises(ValueError, match="total_vram_bytes must be positive"):
        preset_for_vram(0, "sd15")


def test_every_chosen_preset_exists() -> None:
    for family in ("sd1", "sd15", "sd2", "sdxl", "sdxl-refiner"):
        for size in (None, 1 * GIB, 4 * GIB, 8 * GIB, 16 * GIB):
            assert preset_for_vram(size, family) in MEMORY_PRESETS


def test_lower_memory_preset_chain() -> None:
    assert lower_memory_preset("high") == "medvram"
    assert lower_memory_preset("medvram") == "lowvram"
    assert lower_memory_preset("lowvram") == "lowvram-sequential"
    assert lower_memory_preset("lowvram-sequential") is None
    assert lower_memory_preset("cpu") is None
    with pytest.raises(ValueError, match="Unknown memory preset 'ultra'"):
        lower_memory_preset("ultra")


def test_presets_match_their_a1111_counterparts() -> None:
    high, medvram, lowvram, cpu = (MEMORY_PRESETS[name] for name in ("high", "medvram", "lowvram", "cpu"))
    assert (high.dtype, high.offload, high.attention_slicing, high.vae_slicing) == (
        "fp16",
        "none",
        False,
        False,
    )
    assert (medvram.offload, medvram.vae_slicing, medvram.vae_tiling) == ("model", True, False)
    assert (lowvram.offload, lowvram.attention_slicing, lowvram.vae_slicing, lowvram.vae_tiling) == (
        "group",
        True,
        True,
        True,
    )
    assert (cpu.dtype, cpu.device, cpu.offload, cpu.compile) == ("fp32", "cpu", "none", False)


def test_presets_are_read_only() -> None:
    with pytest.raises(TypeError):
        MEMORY_PRESETS["high"] = MemoryOptions()  # type: ignore[index]
    with pytest.raises(ValidationError):
        MEMORY_PRESETS["high"].dtype = "fp32"  # type: ignore[misc]


# --- devices and dtypes on this CPU machine ---------------------------------------------------


def test_resolve_device_and_dtype_on_cpu() -> None:
    assert resolve_device(MemoryOptions()) == CPU
    assert resolve_dtype(MemoryOptions(), CPU) == torch.float32
    assert resolve_dtype(MemoryOptions(dtype="fp16"), CPU) == torch.float32
    assert resolve_dtype(MemoryOptions(dtype="bf16"), CPU) == torch.float32
    assert resolve_dtype(MemoryOptions(dtype="auto"), CUDA) == torch.float16
    assert resolve_dtype(MemoryOptions(dtype="fp32"), CUDA) == torch.float32


def test_explicit_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailableError, match=r"device='cuda'.*no CUDA GPU.*'auto' or 'cpu'"):
        resolve_device(MemoryOptions(device="cuda"))


# --- out-of-memory detection and NaN check ----------------------------------------------------


def wrapped(inner: BaseException) -> RuntimeError:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("generation failed") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (torch.cuda.OutOfMemoryError("allocation failed"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB total)"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (wrapped(torch.OutOfMemoryError("CUDA out of memory")), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
        (MemoryError(), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_free_accelerator_memory_runs_without_cuda() -> None:
    free_accelerator_memory()


def test_decode_has_nan() -> None:
    clean = torch.zeros(1, 3, 8, 8)
    assert decode_has_nan(clean) is False
    assert decode_has_nan(clean.half()) is False
    assert decode_has_nan(torch.full((1, 3, 8, 8), float("nan"))) is True
    with_inf = clean.clone()
    with_inf[0, 0, 0, 0] = float("inf")
    assert decode_has_nan(with_inf) is True
    assert decode_has_nan(np.full((1, 8, 8, 3), np.nan, dtype=np.float32)) is True
    assert decode_has_nan(np.zeros((1, 8, 8, 3), dtype=np.float32)) is False


# --- option validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"attention": "flash"}, "attention"),
        ({"offload": "disk"}, "offload"),
        ({"attention_slicing": "half"}, "attention_slicing"),
        ({"device": "gpu"}, "device"),
        ({"no_half_vea": True}, "no_half_vea"),
    ],
)
def test_invalid_options_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MemoryOptions(**fields)

    assert caught.value.errors()[0]["loc"][0] == field
    assert field in str(caught.value)


def test_device_is_normalised() -> None:
    assert MemoryOptions(device=" CUDA:1 ").device == "cuda:1"
    with pytest.raises(ValidationError, match="use 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"):
        MemoryOptions(device="cuda:x")


def test_reapplying_options_keeps_fp8_unet_weights_and_float32_vae(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda
) -> None:
    """A second apply (the OOM retry, a Settings change) used to cast the whole pipeline back to
    float16 because the float32 VAE made the dtypes differ: the fp8 UNet doubled in memory."""
    options = MemoryOptions(dtype="fp16", fp8_unet=True, no_half_vae=True)
    apply_memory_options(pipe, options, CUDA)
    fp8_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    apply_memory_options(pipe, options.model_copy(update={"vae_slicing": True}), CUDA)

    assert pipe.unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert sum(p.numel() * p.element_size() for p in pipe.unet.parameters()) == fp8_bytes
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float16


def test_compile_is_refused_with_fp8_weights_and_undone_by_offload(
    pipe: StableDiffusionPipeline, fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "_triton_installed", lambda: True)
    lines = apply_memory_options(pipe, MemoryOptions(compile=True, fp8_unet=True), CUDA)
    assert "fp8 weights are cast layer by layer" in line_for(lines, "compile")
    assert not memory.unet_compiled(pipe.unet)

    pipe.unet._compiled_call_impl = pipe.unet._call_impl  # as Module.compile leaves it
    memory.place_with_offload(pipe, "group", torch.device("cpu"))
    assert not memory.unet_compiled(pipe.unet), "CUDA graphs cannot replay over offloaded weights"
