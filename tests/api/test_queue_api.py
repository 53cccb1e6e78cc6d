"""Queue behaviour seen through the API, in-process with an executor that holds jobs on demand:
429 when full, round-robin between users, users isolated from each other's jobs."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.services import StudioServices
from app.settings import StudioSettings
from app.workers.handles import InProcessWorkerHandle
from app.workers.pool import WorkerPool
from contract.artifacts import Artifact, JobOutcome
from contract.events import JobProgress, WorkerState
from contract.worker import ArtifactMessage, JobEventMessage, RunJob
from pipelines.job_control import JobControl

USERS = {"alice": "a-pass", "bob": "b-pass"}
JOB = {"mode": "txt2img", "width": 64, "height": 64, "steps": 2}


class GatedRuntime:
    """A worker's engines stand-in: records prompts in the order jobs run; each job waits for
    ``gate`` (or an interrupt), then returns one image artifact."""

    worker_id = "gated"
    device = "cpu"

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def state(self) -> WorkerState:
        return WorkerState(worker=self.worker_id, device=self.device, kind="in-process")

    def run(self, message: RunJob, send: Any, control: JobControl) -> JobOutcome:
        self.order.append(message.request["prompt"])
        send(JobEventMessage(job_id=message.job_id, progress=JobProgress(stage="sampling", step=1, steps=4)))
        self.started.release()
        while not self.gate.wait(0.02):
            if control.interrupted:
                return JobOutcome(state="cancelled", error="Interrupted before any image was finished.")
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        artifact = Artifact(kind="image", folder="txt2img", extension="png", data=buffer.getvalue(), seed=1)
        send(ArtifactMessage(job_id=message.job_id, artifact=artifact))
        return JobOutcome(state="done", info={"images": [artifact.ref]}, artifacts=[artifact.ref])


@pytest.fixture()
def gated(tmp_path: Path) -> Iterator[tuple[TestClient, GatedRuntime, StudioServices]]:
    from app.api import build_api_app

    settings = StudioSettings(
        models_dir=tmp_path / "models",
        data_dir=tmp_path / "data",
        outputs_dir=tmp_path / "outputs",
        max_queued_jobs=3,
    )
    services = StudioServices.create(settings)
    (tmp_path / "outputs").mkdir()
    executor = GatedRuntime()
    services.workers = WorkerPool([InProcessWorkerHandle(executor)])  # type: ignore[arg-type]
    services.start_queue()
    client = TestClient(build_api_app(services, credentials=list(USERS.items())))
    try:
        yield client, executor, services
    finally:
        executor.gate.set()
        services.queue.stop()


def submit(client: TestClient, user: str, prompt: str) -> Any:
    return client.post("/studio/v1/jobs", json={**JOB, "prompt": prompt}, auth=(user, USERS[user]))


def test_full_queue_is_a_clear_429(gated: tuple[TestClient, GatedRuntime, StudioServices]) -> None:
    client, executor, _ = gated
    assert submit(client, "alice", "running").status_code == 202
    assert executor.started.acquire(timeout=30)
    for index in range(3):
        assert submit(client, "alice", f"waiting {index}").status_code == 202
    refused = submit(client, "bob", "one too many")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"]
    assert "queue is full (3 jobs waiting)" in refused.json()["detail"]


def test_users_take_turns_and_see_only_their_own_jobs(
    gated: tuple[TestClient, GatedRuntime, StudioServices],
) -> None:
    client, executor, services = gated
    first = submit(client, "alice", "a1").json()["id"]
    assert executor.started.acquire(timeout=30)
    queued = [submit(client, "alice", name).json()["id"] for name in ("a2", "a3")]
    submit(client, "bob", "b1")
    bob_view = client.get(f"/studio/v1/jobs/{first}", auth=("bob", USERS["bob"]))
    assert bob_view.status_code == 404
    mine = client.get(f"/studio/v1/jobs/{queued[1]}", auth=("alice", USERS["alice"])).json()
    assert mine["state"] == "queued" and mine["position"] == 3  # after b1 (bob's turn) and a2
    progress = client.get("/sdapi/v1/progress", auth=("bob", USERS["bob"])).json()
    assert progress["state"]["job_count"] == 1 and progress["progress"] == 0  # only bob's queued job
    progress = client.get("/sdapi/v1/progress", auth=("alice", USERS["alice"])).json()
    assert progress["state"]["sampling_step"] == 1 and progress["state"]["job_count"] == 3
    assert client.post("/sdapi/v1/interrupt", auth=("bob", USERS["bob"])).json() == {}
    assert services.queue.status(first).state == "running"  # bob cannot interrupt alice's job
    executor.gate.set()
    for job_id in [first, *queued]:
        services.queue.wait(job_id, timeout=30)
    assert executor.order == ["a1", "b1", "a2", "a3"]


def test_cancel_a_waiting_job(gated: tuple[TestClient, GatedRuntime, StudioServices]) -> None:
    client, executor, services = gated
    alice = ("alice", USERS["alice"])
    submit(client, "alice", "runs")
    assert executor.started.acquire(timeout=30)
    waiting = submit(client, "alice", "waits").json()["id"]
    cancelled = client.delete(f"/studio/v1/jobs/{waiting}", auth=alice)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.delete(f"/studio/v1/jobs/{waiting}", auth=alice).status_code == 409
    executor.gate.set()
    services.queue.wait(services.queue.list(limit=2)[-1].id, timeout=30)
    assert executor.order == ["runs"]
