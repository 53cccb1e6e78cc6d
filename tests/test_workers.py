"""Jobs on real worker processes (CPU, tiny models): the same bytes as in-process, progress and
previews across the process boundary, interrupt and skip, ``kill -9`` of a worker mid-job, a job
that kills its worker every time, and two workers running two users' jobs at once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.services import StudioServices
from app.settings import StudioSettings
from app.workers.process_main import CRASH_MARKER_ENV
from contract.images import Txt2ImgRequest

CRASH_MARKER = "please-crash-the-worker"
JOB = {"width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


def _outputs(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.png") if path.is_file())


@pytest.fixture(scope="module")
def workers(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudioServices]:
    """Two CPU worker processes over the tiny models (torch threads as in-process, so bytes compare)."""
    os.environ[CRASH_MARKER_ENV] = CRASH_MARKER  # inherited by the spawned workers
    work = tmp_path_factory.mktemp("workers")
    settings = StudioSettings(
        models_dir=tiny_models_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        default_checkpoint="tiny-sd1",
        device_ids=["cpu", "cpu"],
    )
    services = StudioServices.create(settings)
    queue = services.start_queue()
    try:
        yield services
    finally:
        queue.stop()
        os.environ.pop(CRASH_MARKER_ENV, None)


def _wait_running(services: StudioServices, job_id: str, min_step: int = 1) -> None:
    queue = services.queue
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = queue.status(job_id)
        assert status is not None and not status.finished, status
        if status.state == "running" and status.step >= min_step:
            return
        queue.wait(job_id, timeout=0.05)
    raise AssertionError("the job never started")


def test_worker_images_are_byte_identical_to_in_process(
    workers: StudioServices, studio: StudioServices
) -> None:
    request = Txt2ImgRequest(prompt="same bytes anywhere", steps=3, batch_size=2, **JOB)
    local = studio.executor.execute(request)
    job = workers.queue.submit(request, owner="bytes")
    status = workers.queue.wait(job, timeout=300)
    assert status.state == "done", status.error
    assert [Path(p).read_bytes() for p in status.images] == [img.path.read_bytes() for img in local.images]
    assert [Path(p).name.split("-")[1] for p in status.images] == ["11.png", "12.png"]  # NNNNN-seed
    assert status.info["images"] == status.images  # refs were replaced by the head's paths
    assert {w.device for w in workers.workers.states()} == {"cpu"}
    assert all(w.kind == "process" and w.pid != os.getpid() for w in workers.workers.states())


def test_progress_previews_and_sse_cross_the_process_boundary(workers: StudioServices) -> None:
    from app.api import build_api_app

    client = TestClient(build_api_app(workers))
    answer = client.post("/studio/v1/jobs", json={"prompt": "watch me", "steps": 150, **JOB})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    previews, steps, workers_seen = [], set(), set()
    with client.stream("GET", f"/studio/v1/jobs/{job_id}/events?previews=true") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                import json

                event = json.loads(line[5:])
                steps.add(event.get("step"))
                if event.get("preview"):
                    previews.append(event["preview"])
                if event.get("worker"):
                    workers_seen.add(event["worker"])
                if event.get("state") in ("done", "failed", "cancelled"):
                    break
    assert workers.queue.status(job_id).state == "done"
    assert steps & set(range(1, 150)), steps  # seen mid-way
    assert previews, "no live preview reached the event stream"
    assert workers_seen <= {"cpu", "cpu-1"} and workers_seen


def test_interrupt_and_skip_reach_the_worker(workers: StudioServices) -> None:
    queue = workers.queue
    # 150 steps a batch: far more than pass between the first step and the Skip on any machine.
    job = queue.submit(Txt2ImgRequest(prompt="skip me", steps=150, n_iter=2, **JOB), owner="skip")
    _wait_running(workers, job)
    queue.skip(job)  # abandons the first batch only
    status = queue.wait(job, timeout=300)
    assert status.state == "done" and len(status.images) == 1
    job = queue.submit(Txt2ImgRequest(prompt="stop me", steps=40, n_iter=3, **JOB), owner="stop")
    _wait_running(workers, job)
    queue.interrupt(job)
    status = queue.wait(job, timeout=300)
    assert status.state in ("cancelled", "done") and len(status.images) < 3


def test_kill_9_mid_job_reruns_it_once_on_a_fresh_worker(workers: StudioServices) -> None:
    from app.api import build_api_app

    client = TestClient(build_api_app(workers))
    before = set(_outputs(workers.outputs_root))
    job = workers.queue.submit(Txt2ImgRequest(prompt="survive", steps=30, batch_size=2, **JOB), owner="kill")
    _wait_running(workers, job, min_step=2)
    victim = workers.workers.get(workers.queue.status(job).worker)
    pid = victim.pid
    os.kill(pid, signal.SIGKILL)
    answers = []
    while not workers.queue.status(job).finished:  # the studio answers throughout
        answers.append(client.get(f"/studio/v1/jobs/{job}").status_code)
        answers.append(client.get("/sdapi/v1/progress").status_code)
        workers.queue.wait(job, timeout=0.1)
    status = workers.queue.status(job)
    assert status.state == "done", status.error
    assert status.attempts == 2
    assert set(answers) == {200}
    new = set(_outputs(workers.outputs_root)) - before
    assert sorted(map(str, new)) == sorted(status.images) and len(new) == 2  # one set, no leftovers
    assert victim.pid != pid  # restarted


def test_a_job_that_kills_its_worker_every_time_fails_with_the_reason(workers: StudioServices) -> None:
    queue = workers.queue
    job = queue.submit(Txt2ImgRequest(prompt=f"{CRASH_MARKER} now", steps=2, **JOB), owner="crash")
    status = queue.wait(job, timeout=300)
    assert status.state == "failed"
    assert status.attempts == 2
    assert "killed (SIGKILL)" in status.error and "probably" in status.error
    after = queue.submit(Txt2ImgRequest(prompt="still fine", steps=2, **JOB), owner="crash")
    assert queue.wait(after, timeout=300).state == "done"


def test_two_workers_run_two_users_jobs_at_the_same_time(workers: StudioServices) -> None:
    """Both workers hold the model, the first job is still running when the second arrives: the
    second goes to the other worker and both run at once. Neither job can end before both were
    seen running (they run until interrupted), so a slow or busy machine cannot change the outcome."""
    queue = workers.queue
    for handle in workers.workers.handles:  # both workers up and idle
        deadline = time.monotonic() + 300
        while not handle.idle and time.monotonic() < deadline:
            time.sleep(0.05)
    assert workers.workers.set_default_model("tiny-sd1", load=True) == []
    # The first job is 8x the second: the cost model would have to judge the idle worker over 10x
    # slower to queue the second behind it, and it outlasts the second's start on any machine.
    first = queue.submit(
        Txt2ImgRequest(prompt="alice's", **{**JOB, "steps": 150, "batch_size": 8}), owner="alice"
    )
    _wait_running(workers, first)
    second = queue.submit(Txt2ImgRequest(prompt="bob's", **{**JOB, "steps": 150}), owner="bob")
    _wait_running(workers, second)
    a, b = queue.status(first), queue.status(second)
    assert a.state == b.state == "running", (a, b)
    assert {a.worker, b.worker} == {"cpu", "cpu-1"}
    queue.interrupt(first)
    queue.interrupt(second)
    for job in (first, second):
        assert queue.wait(job, timeout=300).state in ("cancelled", "done")


def test_a_spread_job_loses_one_worker_and_still_ends_with_one_set_of_images(workers: StudioServices) -> None:
    """Batches of one job on both workers; one worker is killed mid-batch: that batch runs again on a
    fresh worker, the finished batches are kept, and the job ends with exactly its images."""
    queue = workers.queue
    for handle in workers.workers.handles:
        deadline = time.monotonic() + 300
        while not handle.idle and time.monotonic() < deadline:
            time.sleep(0.05)
    before = set(_outputs(workers.outputs_root))
    job = queue.submit(Txt2ImgRequest(prompt="spread and survive", steps=30, n_iter=4, **JOB), owner="spread")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = queue.status(job)
        if status.worker and "," in status.worker and status.step >= 2:
            break
        queue.wait(job, timeout=0.05)
    victim = workers.workers.get(queue.status(job).worker.split(", ")[-1])
    os.kill(victim.pid, signal.SIGKILL)
    status = queue.wait(job, timeout=600)
    assert status.state == "done", status.error
    assert status.info["all_seeds"] == [11, 12, 13, 14]
    new = set(_outputs(workers.outputs_root)) - before
    assert sorted(map(str, new)) == sorted(status.images) and len(new) == 4  # one set, no leftovers
    assert queue.stats.requeues >= 1
