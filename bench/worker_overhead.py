"""Worker processes against in-process jobs, on a full-size SD1.5-architecture model.

No download: a random-weight SD1.5 checkpoint is built from ``configs/sd1`` (as
``bench/engine_overhead.py`` does) and dropped into a temporary ``models/`` folder. Then, in one run:

1. **per-image time**: the same txt2img job (256x256, a few Euler steps) through the queue on one
   worker *process* and on one *in-process* worker, alternating, best run each (target <= 1.03x);
2. **scaling**: the same eight jobs from two users through one CPU worker process and through two
   (``device_ids=["cpu", "cpu"]``), one torch thread per worker (target >= 1.8x on two cores).

Model loading is excluded: each setup runs one warm-up job first.

    .venv/bin/python bench/worker_overhead.py [--steps 4] [--size 256] [--runs 3] [--jobs 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _services(work: Path, name: str, **settings: object):
    from app.services import StudioServices
    from app.settings import StudioSettings

    return StudioServices.create(
        StudioSettings(
            models_dir=work / "models",
            data_dir=work / name / "data",
            outputs_dir=work / name / "outputs",
            default_checkpoint="sd15-random",
            **settings,
        )
    )


def _run(services, requests, owners) -> float:
    queue = services.queue
    started = time.perf_counter()
    ids = [queue.submit(request, owner=owner) for request, owner in zip(requests, owners, strict=True)]
    for job_id in ids:
        status = queue.wait(job_id)
        if status.state != "done":
            raise SystemExit(f"job failed: {status.error}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()

    import torch

    from bench.engine_overhead import build_random_sd15
    from contract.images import Txt2ImgRequest
    from pipelines.models.checkpoint_export import save_single_file_checkpoint

    work = Path(tempfile.mkdtemp(prefix="sdstudio-bench-workers-"))
    checkpoint = work / "models" / "Stable-diffusion" / "sd15-random.safetensors"
    print("building a random full-size SD1.5 checkpoint ...", flush=True)
    save_single_file_checkpoint(
        build_random_sd15(), "sd1", checkpoint, sidecar_yaml=False, dtype=torch.float16
    )

    def job(seed: int) -> Txt2ImgRequest:
        return Txt2ImgRequest(
            prompt="a lighthouse",
            steps=args.steps,
            width=args.size,
            height=args.size,
            seed=seed,
            sampler_name="Euler",
        )

    # 1. per image: one worker process vs one in-process worker (same torch threads)
    threads = torch.get_num_threads()
    process = _services(work, "process", device_ids=["cpu"], worker_torch_threads=threads)
    inproc = _services(work, "inproc", device_ids=["cpu"], in_process_workers=True)
    for services in (process, inproc):
        services.start_queue()
        _run(services, [job(0)], ["warm"])  # loads the model
    times: dict[str, list[float]] = {"process": [], "in-process": []}
    for run in range(args.runs):
        for label, services in (("process", process), ("in-process", inproc)):
            times[label].append(_run(services, [job(run + 1)], ["bench"]))
    process.queue.stop()
    inproc.queue.stop()
    best_p, best_i = min(times["process"]), min(times["in-process"])
    print(f"per image ({args.size}px, {args.steps} steps, {threads} torch threads, best of {args.runs}):")
    ratio = best_p / best_i
    print(f"  worker process {best_p:.2f} s, in-process {best_i:.2f} s, ratio {ratio:.3f} (target <= 1.03)")

    # 2. scaling: two CPU workers vs one, one torch thread each, same jobs from two users
    jobs = [job(100 + i) for i in range(args.jobs)]
    owners = ["alice" if i % 2 == 0 else "bob" for i in range(args.jobs)]
    results = {}
    for label, devices in (("1 worker", ["cpu"]), ("2 workers", ["cpu", "cpu"])):
        services = _services(work, label.replace(" ", "-"), device_ids=devices, worker_torch_threads=1)
        services.start_queue()
        _run(services, [job(1) for _ in devices], [f"warm{i}" for i in range(len(devices))])
        results[label] = _run(services, jobs, owners)
        services.queue.stop()
        print(f"  {label}: {args.jobs} jobs in {results[label]:.2f} s", flush=True)
    speedup = results["1 worker"] / results["2 workers"]
    print(f"two CPU workers vs one on the same {args.jobs} jobs: {speedup:.2f}x (target >= 1.8)")


if __name__ == "__main__":
    main()
