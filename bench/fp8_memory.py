"""Peak memory of the full-size SD1.5 UNet during denoising: 16-bit weights vs fp8 storage (``--fp8-unet``).

Each variant runs in a fresh process so one cannot inherit the other's allocations. On a CUDA GPU
the peak is ``torch.cuda.max_memory_allocated`` over the UNet calls (weights included); on the CPU it
is the process's peak resident memory (Linux ``VmHWM``, reset with ``/proc/self/clear_refs`` just
before the calls) minus the resident memory before the UNet was built, so it too counts the weights
plus what the calls allocate (glibc is told to return freed blocks at once, as CUDA's allocator
would reuse them, so freed per-layer temporaries do not pile up as resident memory). The 16-bit
variant keeps the weights in the compute dtype (float16 on CUDA; bfloat16 on the CPU, which computes
it natively where float16 convolutions are emulated); the fp8 variant stores them in float8 e4m3fn
and computes each layer in that same dtype, applied by our own ``pipelines.generation.memory``
code. Random weights (no download), classifier-free-guidance batch of 2, ``--calls`` UNet calls at
``--size`` px.

    .venv/bin/python bench/fp8_memory.py [--size 512] [--calls 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this CPU measurement needs Linux)")


def measure(variant: str, size: int, calls: int, device_name: str) -> dict[str, float]:
    """One variant in this process: build, place, call the UNet, return MiB and seconds."""
    import torch
    from diffusers import UNet2DConditionModel

    from pipelines.generation.memory import MemoryOptions, _apply_fp8_unet
    from pipelines.models.family_configs import load_component_config

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.bfloat16
    torch.manual_seed(0)
    before = 0 if cuda else _status_kib("VmRSS")
    unet = UNet2DConditionModel.from_config(load_component_config("sd1", "unet"))
    unet.requires_grad_(False)
    unet.to(dtype=dtype)
    if variant == "fp8":
        line = _apply_fp8_unet(SimpleNamespace(unet=unet), MemoryOptions(fp8_unet=True), dtype)
        assert line.startswith("fp8_unet: UNet weights stored"), line
    unet.to(device)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    latent = size // 8
    sample = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    started = time.perf_counter()
    with torch.inference_mode():
        for step in range(calls):
            unet(sample, 999 - step * 50, encoder_hidden_states=context)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (_status_kib("VmHWM") - before) * 1024
    return {
        "weights_mib": weights / 2**20,
        "peak_mib": peak / 2**20,
        "seconds_per_call": (time.perf_counter() - started) / calls,
        "dtype": str(dtype).removeprefix("torch."),
    }


def run_child(variant: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--size",
        str(args.size),
        "--calls",
        str(args.calls),
        "--device",
        args.device,
    ]
    # glibc keeps freed blocks below its (dynamic) mmap threshold in the heap, so resident memory
    # would count layers' freed temporaries; a fixed threshold returns every block >= 64 KiB on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=("16bit", "fp8"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.size, args.calls, args.device)), flush=True)
        return {}
    plain, fp8 = run_child("16bit", args), run_child("fp8", args)
    where = "GPU max_memory_allocated" if args.device.startswith("cuda") else "process peak RSS growth"
    for name, result in (("16-bit weights", plain), ("fp8 storage", fp8)):
        print(
            f"{name:>15} ({result['dtype']} compute): UNet weights {result['weights_mib']:6.0f} MiB, "
            f"peak during {args.calls} UNet calls at {args.size}px ({where}) {result['peak_mib']:6.0f} MiB, "
            f"{result['seconds_per_call']:.2f} s/call",
            flush=True,
        )
    ratios = {
        "weights_ratio": fp8["weights_mib"] / plain["weights_mib"],
        "peak_ratio": fp8["peak_mib"] / plain["peak_mib"],
        "speed_ratio": plain["seconds_per_call"] / fp8["seconds_per_call"],
    }
    print(
        f"fp8 / 16-bit: weights {ratios['weights_ratio']:.3f}x, peak memory {ratios['peak_ratio']:.3f}x "
        f"(issue target <= 0.55x), speed {ratios['speed_ratio']:.2f}x",
        flush=True,
    )
    return ratios


if __name__ == "__main__":
    main()
