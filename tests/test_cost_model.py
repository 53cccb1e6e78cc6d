"""The learned job-cost model (app/jobs/cost_model.py) and how the queue uses it: predictions that
improve as jobs complete, the fast worker chosen over a slow idle one, a job refused up front when
it fits no GPU worker's memory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.jobs.cost_model import JobCostModel, request_features
from app.jobs.queue import JobQueue, JobWontFitError
from app.jobs.store import JobStore
from app.workers.handles import InProcessWorkerHandle
from app.workers.pool import WorkerPool
from contract.artifacts import Artifact, JobOutcome
from contract.events import WorkerState
from contract.images import Txt2ImgRequest
from contract.worker import ArtifactMessage, RunJob
from pipelines.job_control import JobControl

RNG = np.random.default_rng(7)


def random_request() -> dict[str, Any]:
    side = int(RNG.choice([256, 384, 512, 640]))
    return {
        "mode": "txt2img",
        "width": side,
        "height": int(RNG.choice([256, 512, 768])),
        "steps": int(RNG.integers(4, 40)),
        "batch_size": int(RNG.integers(1, 4)),
        "enable_hr": bool(RNG.random() < 0.3),
        "controlnet_units": [{"enabled": True}] * int(RNG.integers(0, 2)),
    }


def true_seconds(features: np.ndarray, speed: float) -> float:
    """A worker's real cost: linear in the features, plus a little noise."""
    base = features @ np.array([0.4, 0.05, 0.06, 0.04, 8.0])
    return float(base * speed * (1 + RNG.normal(0, 0.03)))


def test_prediction_error_shrinks_as_jobs_complete() -> None:
    model = JobCostModel()
    for _ in range(60):
        for worker, speed in (("fast", 1.0), ("slow", 3.0)):
            request = random_request()
            features = request_features(request, loaded=bool(RNG.random() < 0.8))
            predicted = model.predict_seconds(worker, "sd1", features)
            model.record(worker, "sd1", features, true_seconds(features, speed), predicted=predicted)
    errors = model.errors()
    early, late = np.mean(errors[:10]), np.mean(errors[-20:])
    assert late < early / 3 and late < 0.15, (early, late)
    probe = request_features({"mode": "txt2img", "width": 512, "height": 512, "steps": 20}, loaded=True)
    ratio = model.predict_seconds("slow", "sd1", probe) / model.predict_seconds("fast", "sd1", probe)
    assert 2.4 < ratio < 3.6, ratio
    # A new worker borrows the pooled fit before it has runs of its own.
    assert model.predict_seconds("new", "sd1", probe) > 0


def test_features_follow_the_request() -> None:
    small = request_features({"width": 512, "height": 512, "steps": 20}, loaded=True)
    double = request_features({"width": 512, "height": 512, "steps": 40}, loaded=True)
    assert double[1] == pytest.approx(2 * small[1]) and small[4] == 0
    assert request_features({"width": 512, "height": 512, "steps": 20}, loaded=False)[4] == 1
    hires = request_features({"width": 512, "height": 512, "steps": 20, "enable_hr": True}, loaded=True)
    assert hires[2] > 0


class TimedRuntime:
    """A worker whose jobs take ``seconds_per_step`` per step; it reports an artifact per job."""

    device = "cpu"

    def __init__(self, worker_id: str, seconds_per_step: float, vram: int | None = None) -> None:
        self.worker_id = worker_id
        self.seconds_per_step = seconds_per_step
        self.vram = vram
        self.ran: list[str] = []

    def state(self) -> WorkerState:
        return WorkerState(worker=self.worker_id, device="cpu", kind="in-process", vram_total_bytes=self.vram)

    def run(self, message: RunJob, send: Any, control: JobControl) -> JobOutcome:
        self.ran.append(message.request["prompt"])
        time.sleep(self.seconds_per_step * message.request["steps"])
        artifact = Artifact(kind="image", folder="txt2img", extension="png", data=b"x", seed=1)
        send(ArtifactMessage(job_id=message.job_id, artifact=artifact))
        peak = int(message.request["width"] * message.request["height"] * 400) if self.vram else None
        return JobOutcome(state="done", info={}, artifacts=[artifact.ref], peak_vram_bytes=peak)


def make_queue(tmp_path: Path, runtimes: list[TimedRuntime]) -> JobQueue:
    pool = WorkerPool([InProcessWorkerHandle(runtime) for runtime in runtimes])  # type: ignore[arg-type]
    return JobQueue(JobStore(tmp_path / "jobs.sqlite3"), pool, outputs_root=tmp_path / "outputs")


def test_the_fast_worker_is_waited_for_instead_of_a_much_slower_idle_one(tmp_path: Path) -> None:
    fast, slow = TimedRuntime("fast", 0.001), TimedRuntime("slow", 0.001)
    queue = make_queue(tmp_path, [fast, slow])
    job = dict(width=64, height=64, steps=6)
    features = request_features({"mode": "txt2img", **job}, loaded=True)
    # What earlier runs taught the model (set here, not timed: the test must not depend on speed):
    # the slow worker takes a hundred times longer for this job.
    for _ in range(10):
        queue.cost_model.record("fast", None, features, 0.1)
        queue.cost_model.record("slow", None, features, 10.0)
    queue.start()
    try:
        stream = [queue.submit(Txt2ImgRequest(prompt=f"stream {n}", **job), owner="artist") for n in range(6)]
        assert all(queue.wait(j, timeout=120).state == "done" for j in stream)
        # The fast worker finishes each job long before the slow one would: the slow worker,
        # although idle, is given none of them.
        assert len(fast.ran) == 6 and not slow.ran, (fast.ran, slow.ran)
        assert queue.cost_model.mean_relative_error() is not None
    finally:
        queue.stop()


def test_a_job_that_fits_no_gpu_is_refused_when_submitted(tmp_path: Path) -> None:
    runtimes = [TimedRuntime("gpu0", 0.0, vram=8 * 2**30), TimedRuntime("gpu1", 0.0, vram=12 * 2**30)]
    queue = make_queue(tmp_path, runtimes)
    queue.start()
    try:
        for side in (64, 128, 256, 128, 64, 256):  # peak memory reported: 400 bytes per pixel
            jobs = [
                queue.submit(
                    Txt2ImgRequest(prompt=f"m{side}-{n}", width=side, height=side, steps=1), owner=f"o{n}"
                )
                for n in range(2)
            ]
            assert all(queue.wait(j, timeout=60).state == "done" for j in jobs)
        with pytest.raises(JobWontFitError, match=r"largest GPU in the studio has 12\.0 GB"):
            queue.submit(Txt2ImgRequest(prompt="huge", width=8192, height=8192, steps=1))
        assert (
            queue.wait(queue.submit(Txt2ImgRequest(prompt="ok", width=512, height=512, steps=1)), 60).state
            == "done"
        )
    finally:
        queue.stop()


def test_eta_is_shown_for_queued_jobs(tmp_path: Path) -> None:
    runtime = TimedRuntime("only", 0.002)
    gate = threading.Event()
    original = runtime.run

    def gated(message: RunJob, send: Any, control: JobControl) -> JobOutcome:
        gate.wait(30)
        return original(message, send, control)

    runtime.run = gated  # type: ignore[method-assign]
    queue = make_queue(tmp_path, [runtime])
    queue.start()
    try:
        first = queue.submit(Txt2ImgRequest(prompt="first", width=64, height=64, steps=5))
        second = queue.submit(Txt2ImgRequest(prompt="second", width=64, height=64, steps=5))
        status = queue.status(second)
        assert status.state == "queued" and status.eta_seconds is not None and status.eta_seconds > 0
        gate.set()
        assert queue.wait(first, 60).state == queue.wait(second, 60).state == "done"
    finally:
        gate.set()
        queue.stop()


def test_metrics_endpoint_reports_jobs_workers_and_the_cost_model(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from app.api import build_api_app
    from app.services import StudioServices
    from app.settings import StudioSettings

    settings = StudioSettings(
        data_dir=tmp_path / "data", outputs_dir=tmp_path / "outputs", models_dir=tmp_path
    )
    services = StudioServices.create(settings)
    services.__dict__["queue"] = make_queue(tmp_path, [TimedRuntime("w0", 0.001)])
    services.start_queue()
    try:
        for n in range(3):
            job = services.queue.submit(Txt2ImgRequest(prompt=f"m{n}", width=64, height=64, steps=2))
            assert services.queue.wait(job, timeout=60).state == "done"
        client = TestClient(build_api_app(services, credentials=[("admin", "pw")]))
        assert client.get("/metrics").status_code == 401
        answer = client.get("/metrics", auth=("admin", "pw"))
        assert answer.status_code == 200
        families = {family.name: family for family in text_string_to_metric_families(answer.text)}
        jobs = {sample.labels["state"]: sample.value for sample in families["sdstudio_jobs"].samples}
        assert jobs["done"] == 3 and jobs["queued"] == 0
        counts = [s for s in families["sdstudio_job_seconds"].samples if s.name.endswith("_count")]
        assert counts and counts[0].value == 3
        busy = families["sdstudio_worker_busy_fraction"].samples
        assert [s.labels["worker"] for s in busy] == ["w0"] and 0 < busy[0].value <= 1
        assert "sdstudio_requeues" in families and "sdstudio_cost_model_relative_error" in families
    finally:
        services.queue.stop()


def test_new_workers_warm_up_while_the_queue_is_empty_and_seed_the_model(tmp_path: Path) -> None:
    """Each worker runs one short warm-up job of its own when nothing waits: the cost model gets a
    measurement per worker before the first real job; nothing is stored and no file is written."""
    from app.jobs.queue import WARMUP_REQUEST

    runtimes = [TimedRuntime("gpu0", 0.001), TimedRuntime("gpu1", 0.001)]
    pool = WorkerPool([InProcessWorkerHandle(runtime) for runtime in runtimes])  # type: ignore[arg-type]
    store = JobStore(tmp_path / "jobs.sqlite3")
    queue = JobQueue(store, pool, outputs_root=tmp_path / "outputs", warmup=True)
    queue.start()
    try:
        deadline = time.monotonic() + 600  # a bound on waiting, not a speed requirement
        while queue.cost_model.runs() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.cost_model.runs() == 2
        assert [runtime.ran for runtime in runtimes] == [[WARMUP_REQUEST["prompt"]]] * 2
        assert store.list(limit=10) == [] and not (tmp_path / "outputs").exists()
        job = queue.submit(Txt2ImgRequest(prompt="real", width=64, height=64, steps=2))
        assert queue.wait(job, timeout=120).state == "done"
        assert sum(runtime.ran.count("real") for runtime in runtimes) == 1  # no second warm-up
        assert sum(len(runtime.ran) for runtime in runtimes) == 3
    finally:
        queue.stop()
