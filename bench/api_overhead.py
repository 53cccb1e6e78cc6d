"""What the REST API costs on top of the engine, and the queue's throughput under concurrent clients.

A tiny random-weight SD1 checkpoint (tests/tiny_models.py) is served by the real API app (uvicorn on
127.0.0.1, HTTP Basic on) in this process, sharing one engine with the in-process reference, so
both sides use the same loaded model:

1. one txt2img through ``POST /sdapi/v1/txt2img`` (validation, durable queue, wait, base64 PNGs)
   against the same request run by the executor directly, alternating runs; the ratio uses each
   side's best run (the least disturbed by other work on the machine), medians are printed too;
2. 8 clients (8 API users, so the queue takes them round-robin) each sending blocking txt2img
   requests at once, as jobs per second against the same number of jobs run back to back
   in-process.

    .venv/bin/python bench/api_overhead.py [--steps 2] [--size 64] [--runs 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_api(services: Any, users: list[tuple[str, str]]) -> tuple[str, Any]:
    import uvicorn

    from app.api import build_api_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_api_app(services, credentials=users), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    args = parser.parse_args()

    import requests

    from app.services import StudioServices
    from app.settings import StudioSettings
    from contract.images import Txt2ImgRequest
    from tests.tiny_models import save_single_file, tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="api-bench-"))
    save_single_file(
        tiny_pipeline("sd1", seed=0), work / "models" / "Stable-diffusion" / "tiny.safetensors", "sd1"
    )
    settings = StudioSettings(
        models_dir=work / "models",
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        default_checkpoint="tiny",
        max_queued_jobs=1000,
    )
    services = StudioServices.create(settings)
    services.start_queue()
    users = [(f"user{i}", f"pass{i}") for i in range(args.clients)]
    url, server = start_api(services, users)
    body = {"prompt": "a lighthouse", "seed": 1, "steps": args.steps, "width": args.size, "height": args.size}

    def in_process() -> None:
        services.executor.execute(Txt2ImgRequest(**body))

    def through_api(user: tuple[str, str] = users[0]) -> None:
        response = requests.post(url + "/sdapi/v1/txt2img", json=body, auth=user, timeout=600)
        response.raise_for_status()

    in_process()  # load the model and warm up both paths
    through_api()
    direct: list[float] = []
    api: list[float] = []
    for _ in range(args.runs):
        for run, times in ((in_process, direct), (through_api, api)):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    print(
        f"txt2img {args.size}x{args.size}, {args.steps} steps: API {min(api):.3f}s vs in-process "
        f"{min(direct):.3f}s (best of {args.runs}); ratio {min(api) / min(direct):.2f}x "
        f"(medians {statistics.median(api):.3f}s / {statistics.median(direct):.3f}s = "
        f"{statistics.median(api) / statistics.median(direct):.2f}x)"
    )

    total = args.clients * args.jobs_per_client
    started = time.perf_counter()
    for _ in range(total):
        in_process()
    sequential = total / (time.perf_counter() - started)

    def client(user: tuple[str, str]) -> None:
        for _ in range(args.jobs_per_client):
            through_api(user)

    threads = [threading.Thread(target=client, args=(user,)) for user in users]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent = total / (time.perf_counter() - started)
    print(
        f"queue throughput, {args.clients} concurrent API clients x {args.jobs_per_client} jobs: "
        f"{concurrent:.2f} jobs/s vs {sequential:.2f} jobs/s in-process back to back; "
        f"ratio {concurrent / sequential:.2f}x"
    )
    server.should_exit = True
    services.queue.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
