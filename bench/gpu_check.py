"""The GPU check of issue 13, one command: speed and memory of every option on one CUDA GPU.

    .venv/bin/python bench/gpu_check.py            # on an RTX / Hopper-class GPU: about 5-8 minutes
    .venv/bin/python bench/gpu_check.py --smoke    # CPU, tiny models, a minute: proves the script runs

No download: the SD1.5-architecture model is random-weight (``bench/engine_overhead.py``); timings
of random weights equal real ones (same shapes, same kernels). Printed, each against a reference
measured in the same run:

1. SD1.5 512x512 it/s: our pipeline setup (``apply_memory_options``, preset ``high``) vs plain
   diffusers in fp16 with SDPA (target >= 1.0x);
2. each speed option vs the same pipeline without it (``bench/speed_options.py`` at 512 px, token
   merging at 768 px);
3. xFormers vs SDPA (when xFormers is installed), channels-last on vs off;
4. peak VRAM and s/image for each memory preset: ``high``, ``medvram``, ``lowvram`` (group offload),
   ``lowvram-sequential`` (A1111's sequential offload), ``high`` + fp8 UNet weights;
5. the out-of-memory fallback under a memory cap (``torch.cuda.set_per_process_memory_fraction``):
   the preset chain the engine walks, and which preset finished;
6. talking-head frames per second at 256 and 512 px (reference generator forward vs ours).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def say(text: str) -> None:
    print(text, flush=True)


def build_pipe(smoke: bool) -> Any:
    from diffusers import EulerDiscreteScheduler

    if smoke:
        from tests.tiny_models import tiny_pipeline

        pipe = tiny_pipeline("sd1", seed=0)
    else:
        from bench.engine_overhead import build_random_sd15

        pipe = build_random_sd15()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seconds_per_image(pipe: Any, size: int, steps: int, device: Any, runs: int = 2) -> float:
    import torch

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            pipe(
                "a lighthouse",
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    once()
    return min(once() for _ in range(runs))


def fresh(base: Any) -> Any:
    """A copy of the CPU pipeline for one configuration (offload hooks cannot be taken off cleanly)."""
    return copy.deepcopy(base)


def check_plain_vs_ours(base: Any, size: int, steps: int, device: Any) -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pipelines.generation.memory import MEMORY_PRESETS, MemoryOptions, apply_memory_options

    cuda = device.type == "cuda"
    plain = fresh(base).to(device=device, dtype=torch.float16 if cuda else torch.float32)
    plain.unet.set_attn_processor(AttnProcessor2_0())
    ours = fresh(base)
    options = MEMORY_PRESETS["high"] if cuda else MemoryOptions(device="cpu", dtype="fp32", attention="sdpa")
    apply_memory_options(ours, options.model_copy(update={"attention": "sdpa"}), device)
    plain_s, ours_s = (
        seconds_per_image(plain, size, steps, device),
        seconds_per_image(ours, size, steps, device),
    )
    say(
        f"[1] SD1.5 {size}x{size}: ours {steps / ours_s:.2f} it/s, plain diffusers fp16+SDPA "
        f"{steps / plain_s:.2f} it/s -> {plain_s / ours_s:.3f}x (target >= 1.0)"
    )
    del plain, ours


def check_attention_and_layout(base: Any, size: int, steps: int, device: Any) -> None:
    from pipelines.generation.memory import MemoryOptions, _xformers_installed, apply_memory_options

    cuda = device.type == "cuda"
    dtype = "fp16" if cuda else "fp32"
    results = {}
    for name, options in (
        ("sdpa", MemoryOptions(device=str(device), dtype=dtype, attention="sdpa")),
        (
            "sdpa + channels-last",
            MemoryOptions(device=str(device), dtype=dtype, attention="sdpa", channels_last=True),
        ),
        ("xformers", MemoryOptions(device=str(device), dtype=dtype, attention="xformers")),
    ):
        if name == "xformers" and not (cuda and _xformers_installed()):
            say("[3] xformers: skipped (needs CUDA and xFormers: pip install -r requirements-xformers.txt)")
            continue
        pipe = fresh(base)
        apply_memory_options(pipe, options, device)
        results[name] = seconds_per_image(pipe, size, steps, device)
        del pipe
    for name, value in results.items():
        say(f"[3] {name:>22}: {steps / value:.2f} it/s ({results['sdpa'] / value:.3f}x vs sdpa)")


def check_presets(base: Any, size: int, steps: int, device: Any) -> None:
    import torch

    from pipelines.generation.memory import MEMORY_PRESETS, apply_memory_options

    if device.type != "cuda":
        say("[4] memory presets: skipped (peak VRAM needs a CUDA GPU)")
        return
    for name, update in (
        ("high", {}),
        ("medvram", {}),
        ("lowvram", {}),
        ("lowvram-sequential", {}),
        ("high", {"fp8_unet": True}),
        ("medvram", {"fp8_unet": True}),
    ):
        release_gpu_memory()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pipe = fresh(base)
        options = MEMORY_PRESETS[name].model_copy(update=update)
        apply_memory_options(pipe, options, device)
        seconds = seconds_per_image(pipe, size, steps, device, runs=1)
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30
        label = name + (" + fp8 UNet" if update else "")
        say(f"[4] {label:>22}: peak VRAM {peak:6.2f} GiB, {seconds:6.2f} s/image")
        del pipe


def release_gpu_memory() -> None:
    """Offload and layerwise-casting hooks keep models alive in reference cycles: collect them so
    one configuration's weights do not count in the next one's peak."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_oom_fallback(base: Any, size: int, steps: int, device: Any, cap_gib: float) -> None:
    import torch

    from pipelines.generation.memory import (
        MEMORY_PRESETS,
        apply_memory_options,
        free_accelerator_memory,
        is_out_of_memory,
        lower_memory_preset,
    )

    if device.type != "cuda":
        say("[5] OOM fallback: skipped (needs a CUDA GPU to cap)")
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    release_gpu_memory()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / total), index)
    walked = []
    preset: str | None = "high"
    # One pipeline through the whole chain, as the engine's retry does (it lowers the preset of
    # the pipeline already loaded, so each switch must take the previous offloading off).
    pipe = fresh(base)
    seconds: float | None = None
    try:
        while preset is not None:
            walked.append(preset)
            out_of_memory = False
            try:
                apply_memory_options(pipe, MEMORY_PRESETS[preset], device)
                seconds = seconds_per_image(pipe, size, steps, device, runs=1)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                out_of_memory = True
            if not out_of_memory:
                break
            free_accelerator_memory()  # outside the except block: its traceback holds tensors
            preset = lower_memory_preset(preset)
        chain = " -> ".join(walked)
        if seconds is not None and preset is not None:
            say(f"[5] OOM fallback under a {cap_gib:g} GiB cap: {chain}; finished in {seconds:.2f} s")
        else:
            say(f"[5] OOM fallback under a {cap_gib:g} GiB cap: {chain}; every preset ran out of memory")
    finally:
        del pipe
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        release_gpu_memory()


def check_talking_head(device: Any, sizes: list[int], batch: int) -> None:
    from bench.talking_head import compare_renderer

    for size in sizes:
        args = argparse.Namespace(device=str(device), size=size, batch_size=batch, runs=1)
        ratios = compare_renderer(args)
        say(
            f"[6] talking head {size} px: ours fp32 {ratios['ours fp32']:.3f}x the reference's time per frame"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: check the script itself")
    parser.add_argument(
        "--oom-cap-gib", type=float, default=2.5, help="memory cap for the OOM fallback check"
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], help="parts to skip: plain options attention presets oom talk"
    )
    args = parser.parse_args(argv)

    import torch

    started = time.perf_counter()
    if args.smoke:
        device, size, steps = torch.device("cpu"), 64, 2
    elif not torch.cuda.is_available():
        raise SystemExit(
            "No CUDA GPU visible to this PyTorch; run with --smoke to check the script on the CPU."
        )
    else:
        device, size, steps = torch.device("cuda"), 512, 20
        say(
            f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    base = build_pipe(args.smoke)
    if device.type == "cuda":
        base.to(dtype=torch.float16)  # every configuration below runs fp16: copies are half the size
    parts: list[tuple[str, Callable[[], None]]] = [
        ("plain", lambda: check_plain_vs_ours(base, size, steps, device)),
        ("options", lambda: run_speed_options(args.smoke, device)),
        ("attention", lambda: check_attention_and_layout(base, size, steps, device)),
        ("presets", lambda: check_presets(base, size, steps, device)),
        ("oom", lambda: check_oom_fallback(base, size, steps, device, args.oom_cap_gib)),
        (
            "talk",
            lambda: check_talking_head(device, [128] if args.smoke else [256, 512], 1 if args.smoke else 4),
        ),
    ]
    for name, part in parts:
        if name in args.skip:
            continue
        part()
        release_gpu_memory()
    say(f"gpu_check finished in {time.perf_counter() - started:.0f} s")


def run_speed_options(smoke: bool, device: Any) -> None:
    from bench import speed_options

    if smoke:
        say(
            "[2] speed options: tests/test_speed_options.py on tiny models; full size: bench/speed_options.py"
        )
        return
    speed_options.main(
        ["--device", str(device), "--size", "512", "--tome-size", "768", "--steps", "20", "--runs", "2"]
    )


if __name__ == "__main__":
    main()
