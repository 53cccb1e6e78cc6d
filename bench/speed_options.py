"""Each speed option against the same pipeline without it, on a full-size SD1.5-architecture model.

No download: the model is random-weight (seeded) from ``configs/sd1`` (``bench/engine_overhead.py``).
One plain diffusers ``StableDiffusionPipeline`` (Euler) is timed per image with nothing attached,
then with each option attached by our code (``pipelines/generation/speedups.py``, ``memory.py``),
runs interleaved (plain, option A, option B, ..., plain, ...) so a busy machine disturbs them alike;
printed: best and median seconds per image and the ratio plain/option of each (>1: faster). fp8
also prints the UNet's resident weight bytes against float16 and float32.

    .venv/bin/python bench/speed_options.py [--size 256] [--steps 9] [--runs 3] [--tome-size 384]
        [--device cpu|cuda] [--options deepcache tome fp8]

On a GPU use ``bench/gpu_check.py`` (it calls this with the issue's sizes: 512 and 768).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_overhead import build_random_sd15  # noqa: E402


def unet_weight_bytes(unet: Any) -> int:
    return sum(p.numel() * p.element_size() for p in unet.parameters())


def make_runner(pipe: Any, size: int, steps: int, device: str) -> Callable[[], Any]:
    import torch

    def run() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        with torch.inference_mode():
            return pipe(
                "a lighthouse at dusk",
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=generator,
                output_type="np",
            ).images

    return run


def timed(run: Callable[[], Any], context: Callable[[], AbstractContextManager[Any]], device: str) -> float:
    import torch

    with context():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started


def compare(
    label: str,
    run: Callable[[], Any],
    options: dict[str, Callable[[], AbstractContextManager[Any]]],
    runs: int,
    device: str,
) -> dict[str, float]:
    """Interleaved timing of plain vs each option; prints and returns the best-run ratios."""
    variants = {"plain": nullcontext, **options}
    for context in variants.values():  # warm-up (allocations, kernels)
        timed(run, context, device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, context in variants.items():
            times[name].append(timed(run, context, device))
    ratios = {}
    plain_best = min(times["plain"])
    for name, values in times.items():
        ratio = plain_best / min(values)
        ratios[name] = ratio
        median_ratio = statistics.median(times["plain"]) / statistics.median(values)
        print(
            f"{label:>10} {name:>24}: best {min(values):7.2f} s/image, "
            f"median {statistics.median(values):7.2f}; speed-up vs plain: best runs {ratio:5.2f}x, "
            f"medians {median_ratio:5.2f}x",
            flush=True,
        )
    return ratios


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image size for step caching and fp8")
    parser.add_argument("--tome-size", type=int, default=384, help="image size for token merging")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--options", nargs="+", default=["deepcache", "tome", "fp8"])
    args = parser.parse_args(argv)

    import torch

    from pipelines.generation.memory import MemoryOptions, apply_memory_options
    from pipelines.generation.speedups import JobSpeedups, SpeedOptions

    dtype_name = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    device = torch.device(args.device)
    pipe = build_random_sd15()
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    apply_memory_options(pipe, MemoryOptions(dtype=dtype_name, attention="sdpa", device=args.device), device)
    print(
        f"full-size random SD1.5, Euler, {args.steps} steps, {dtype_name} on {device} "
        f"(torch threads {torch.get_num_threads()}), best of {args.runs} interleaved runs",
        flush=True,
    )

    def speedups(**options: Any) -> Callable[[], AbstractContextManager[Any]]:
        return lambda: JobSpeedups(SpeedOptions(**options)).attached(pipe.unet)

    results: dict[str, float] = {}
    if "deepcache" in args.options:
        run = make_runner(pipe, args.size, args.steps, args.device)
        ratios = compare(
            f"{args.size}x{args.size}",
            run,
            {"cache_interval=2": speedups(cache_interval=2), "cache_interval=3": speedups(cache_interval=3)},
            args.runs,
            args.device,
        )
        results.update({f"deepcache_{k}": v for k, v in ratios.items() if k != "plain"})
    if "tome" in args.options:
        run = make_runner(pipe, args.tome_size, args.steps, args.device)
        ratios = compare(
            f"{args.tome_size}x{args.tome_size}",
            run,
            {"token_merging_ratio=0.5": speedups(token_merging_ratio=0.5)},
            args.runs,
            args.device,
        )
        results.update({f"tome_{k}": v for k, v in ratios.items() if k != "plain"})
    if "fp8" in args.options:
        compute = pipe.unet.dtype
        plain_bytes = unet_weight_bytes(pipe.unet)
        fp16_bytes = sum(p.numel() * 2 for p in pipe.unet.parameters())
        run = make_runner(pipe, args.size, args.steps, args.device)
        plain_time = min(timed(run, nullcontext, args.device) for _ in range(args.runs))
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
        timed(run, nullcontext, args.device)
        fp8_time = min(timed(run, nullcontext, args.device) for _ in range(args.runs))
        fp8_bytes = unet_weight_bytes(pipe.unet)
        print(
            f"{'fp8 UNet weights':>22}: resident UNet weights {fp8_bytes / 2**20:.0f} MiB vs "
            f"{fp16_bytes / 2**20:.0f} MiB in fp16 ({fp8_bytes / fp16_bytes:.3f}x) and "
            f"{plain_bytes / 2**20:.0f} MiB as loaded ({fp8_bytes / plain_bytes:.3f}x); per image "
            f"{fp8_time:.2f} s vs {plain_time:.2f} s (speed ratio {plain_time / fp8_time:.2f}x, "
            "sequential runs: the casting is not undone)",
            flush=True,
        )
        results["fp8_weight_ratio_vs_fp16"] = fp8_bytes / fp16_bytes
        results["fp8_speed_ratio"] = plain_time / fp8_time
    return results


if __name__ == "__main__":
    main()
