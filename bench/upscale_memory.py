"""Peak memory of tiled against untiled upscaling, same model, same input.

No download: an ESRGAN network of the real size (64 filters, 23 RRDB blocks, 4x, ~16.7M
parameters, as ``RealESRGAN_x4plus``/``4x-UltraSharp``) is built with seeded random weights and
loaded through spandrel, then a random image is upscaled once untiled and once tiled, each in its
own subprocess so neither run's high-water mark hides the other's:

* with CUDA: ``torch.cuda.max_memory_allocated`` during the upscale, minus what was allocated
  before it (model weights, input);
* on CPU: the growth of the process's peak RSS (``resource.getrusage``) during the upscale; the
  assembled full-size float32 result is part of both numbers.

It prints both peaks and their ratio; there are no assertions. On CPU the default 512px run
takes minutes; ``--size 256`` is quicker.

    .venv/bin/python bench/upscale_memory.py [--size 512] [--tile 256] [--overlap 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size, or ``None`` where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


def run_child(args: argparse.Namespace) -> dict[str, object]:
    """One upscale in this process; returns what it measured."""
    import torch
    from spandrel import ModelLoader
    from spandrel.architectures.ESRGAN import ESRGAN

    from pipelines.postprocess.upscalers import run_image_model_tiled

    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(0)
    network = ESRGAN(num_filters=args.nf, num_blocks=args.nb, scale=4)
    for parameter in network.parameters():  # keep activations in range with random weights
        parameter.data.mul_(0.1)
    descriptor = ModelLoader().load_from_state_dict(network.state_dict()).eval()
    del network
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    descriptor.to(device, dtype)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    tile = 0 if args.child == "untiled" else args.tile

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = peak_rss_bytes() or 0
    start = time.perf_counter()
    output = run_image_model_tiled(descriptor, image, tile=tile, tile_overlap=args.overlap)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - before
        measure = "CUDA max_memory_allocated growth"
    else:
        after = peak_rss_bytes()
        peak = (after - before) if after is not None else -1
        measure = "peak RSS growth"
    return {
        "mode": args.child,
        "tile": tile,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "output": list(output.shape),
        "peak_bytes": peak,
        "measure": measure,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="input width and height (default 512)")
    parser.add_argument("--tile", type=int, default=256, help="tile size of the tiled run (default 256)")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap (default 32)")
    parser.add_argument("--nf", type=int, default=64, help="ESRGAN filters (default 64)")
    parser.add_argument("--nb", type=int, default=23, help="ESRGAN RRDB blocks (default 23)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--child", choices=("untiled", "tiled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    results = {}
    for mode in ("untiled", "tiled"):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
        for flag in ("size", "tile", "overlap", "nf", "nb", "device"):
            command += [f"--{flag}", str(getattr(args, flag))]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            sys.exit(f"{mode} run failed:\n{completed.stderr[-4000:]}")
        results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:>8}: tile={r['tile']:<4} {r['device']} {r['dtype']} "
            f"-> {r['output'][3]}x{r['output'][2]}, "
            f"{r['measure']} {r['peak_bytes'] / 2**20:,.0f} MiB, {r['seconds']} s"
        )
    untiled, tiled = results["untiled"]["peak_bytes"], results["tiled"]["peak_bytes"]
    if untiled > 0 and tiled > 0:
        print(f"untiled/tiled peak memory: {untiled / tiled:.2f}x")
    else:
        print("peak memory could not be measured on this platform")


if __name__ == "__main__":
    main()
