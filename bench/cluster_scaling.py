"""The studio cluster on Ray: scaling from one worker to two, and a Ray worker's per-job overhead.

No download: a random-weight SD1.5 checkpoint (full size) is built from ``configs/sd1`` and dropped
into a temporary ``models/`` folder. A real two-node Ray cluster is started on this machine
(``ray.cluster_utils.Cluster``, token auth on), each node with one worker slot. In one run:

1. **scaling**: the same jobs from two users on one Ray worker (the second node not yet added) and
   on two, one torch thread each: images per second, as a ratio (target >= 1.8 on two cores);
   then one job with ``n_iter`` batches spread over the two workers against the same job on one;
2. **a split talking head**: the same clip (real random-weight SadTalker networks, 256 px, crop mode,
   ``--talk-seconds`` of speech-like audio) on one worker and split over two (motion on one, frame
   ranges on both, joined and encoded by the head), wall time per job as a ratio, and whether the
   decoded frames are equal; the second worker loads its networks inside the timed run (the first
   loaded them in the one-worker run), so the ratio is on the cautious side;
3. **dispatch overhead**: a tiny job (1 step, 64x64) on a Ray worker against a local worker
   process, alternating, median of several runs: the difference is what Ray adds per job.

Model loading is excluded for the image jobs (a warm-up job per worker first).

    .venv/bin/python bench/cluster_scaling.py [--steps 4] [--size 256] [--jobs 8] [--runs 5]
        [--talk-seconds 0.64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKEN = "bench" * 13
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN})  # before ray is imported


def _services(work: Path, name: str, **settings: object):
    from app.services import StudioServices
    from app.settings import StudioSettings

    (work / name / "data").mkdir(parents=True, exist_ok=True)
    (work / name / "data" / "cluster_token").write_text(TOKEN)
    return StudioServices.create(
        StudioSettings(
            models_dir=work / "models",
            data_dir=work / name / "data",
            outputs_dir=work / name / "outputs",
            default_checkpoint="sd15-random",
            worker_torch_threads=1,
            **settings,
        )
    )


def _wait_workers(services, count: int) -> None:
    deadline = time.monotonic() + 900
    while len(services.queue.workers.idle()) < count:
        if time.monotonic() > deadline:
            raise SystemExit("the cluster's workers did not come up")
        time.sleep(0.2)


def _talking_head_job(work: Path, seconds: float):
    """Random-weight SadTalker files in the bench's models/, a portrait and speech-like audio."""
    import cv2
    from skimage import data

    from bench.talking_head import write_random_models, write_speech_like
    from contract.talking_head import TalkingHeadRequest

    write_random_models(work / "models")
    portrait = work / "portrait.png"
    cv2.imwrite(str(portrait), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    write_speech_like(work / "speech.wav", seconds)
    return TalkingHeadRequest(image=portrait, audio=work / "speech.wav", seed=3, batch_size=2)


def _run_talking_head(services, request) -> tuple[float, Path]:
    started = time.perf_counter()
    status = services.queue.wait(services.queue.submit(request, owner="talk"))
    if status.state != "done":
        raise SystemExit(f"talking head failed: {status.error}")
    return time.perf_counter() - started, Path(status.images[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--talk-seconds", type=float, default=0.64, help="speech of the split talking head (0: skip it)"
    )
    args = parser.parse_args()

    import ray
    import torch
    from ray.cluster_utils import Cluster

    from bench.engine_overhead import build_random_sd15
    from bench.worker_overhead import _run
    from contract.images import Txt2ImgRequest
    from pipelines.models.checkpoint_export import save_single_file_checkpoint

    work = Path(tempfile.mkdtemp(prefix="sdstudio-bench-cluster-"))
    print("building a random full-size SD1.5 checkpoint ...", flush=True)
    save_single_file_checkpoint(
        build_random_sd15(),
        "sd1",
        work / "models" / "Stable-diffusion" / "sd15-random.safetensors",
        sidecar_yaml=False,
        dtype=torch.float16,
    )

    def job(seed: int, **extra: object) -> Txt2ImgRequest:
        fields = {"steps": args.steps, "width": args.size, "height": args.size, **extra}
        return Txt2ImgRequest(prompt="a lighthouse", seed=seed, sampler_name="Euler", **fields)

    env = {"PYTHONPATH": str(ROOT)}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"sdstudio_worker": 1}, "env_vars": env},
    )
    services = _services(work, "cluster", cluster_address=cluster.address, talking_head_split_seconds=0)
    talk = _talking_head_job(work, args.talk_seconds) if args.talk_seconds > 0 else None
    services.start_queue()
    _wait_workers(services, 1)
    _run(services, [job(1)], ["warm"])

    jobs = [job(100 + i) for i in range(args.jobs)]
    owners = ["alice" if i % 2 == 0 else "bob" for i in range(args.jobs)]
    one = _run(services, jobs, owners)
    print(f"  1 Ray worker: {args.jobs} jobs in {one:.2f} s ({args.jobs / one:.3f} images/s)", flush=True)
    batch = job(500, n_iter=args.jobs)
    one_batch = _run(services, [batch], ["batch"])
    if talk is not None:
        one_talk, one_video = _run_talking_head(services, talk)
        print(f"  1 Ray worker: talking head of {args.talk_seconds} s in {one_talk:.1f} s", flush=True)

    cluster.add_node(num_cpus=1, resources={"sdstudio_worker": 1}, env_vars=env)
    _wait_workers(services, 2)
    _run(services, [job(2), job(3)], ["warm", "warm2"])
    two = _run(services, jobs, owners)
    print(f"  2 Ray workers: {args.jobs} jobs in {two:.2f} s ({args.jobs / two:.3f} images/s)", flush=True)
    two_batch = _run(services, [batch], ["batch"])
    print(f"two Ray workers vs one on the same {args.jobs} jobs: {one / two:.2f}x (target >= 1.8)")
    print(f"one job of {args.jobs} batches spread over two workers vs one: {one_batch / two_batch:.2f}x")
    if talk is not None:
        from tests.sadtalker.helpers import decode_frames

        two_talk, two_video = _run_talking_head(services, talk)
        same = bool((decode_frames(one_video) == decode_frames(two_video)).all())
        print(
            f"talking head of {args.talk_seconds} s split over two workers vs one: "
            f"{one_talk / two_talk:.2f}x "
            f"({one_talk:.1f} s vs {two_talk:.1f} s; decoded frames equal: {same})",
            flush=True,
        )

    # dispatch overhead: Ray worker vs a local worker process, the tiniest job
    local = _services(work, "local", device_ids=["cpu"])
    local.start_queue()
    tiny = job(7, steps=1, width=64, height=64)
    _run(local, [tiny], ["warm"])
    times: dict[str, list[float]] = {"ray": [], "process": []}
    for _ in range(args.runs):
        times["ray"].append(_run(services, [tiny], ["tiny"]))
        times["process"].append(_run(local, [tiny], ["tiny"]))
    ray_median, local_median = statistics.median(times["ray"]), statistics.median(times["process"])
    added = 1000 * (ray_median - local_median)
    print(
        f"tiny job (1 step, 64x64), median of {args.runs}: Ray worker {ray_median * 1000:.0f} ms, "
        f"local worker process {local_median * 1000:.0f} ms: Ray adds {added:.0f} ms per job "
        f"(ratio {ray_median / local_median:.2f})"
    )
    local.queue.stop()
    services.queue.stop()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
