"""The durable job queue: results, fairness, limits, cancel/interrupt and crash recovery."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from app.jobs.queue import JobQueue, QueueFullError
from app.jobs.store import JobStore
from app.workers.handles import InProcessWorkerHandle
from app.workers.pool import WorkerPool
from contract.artifacts import Artifact, JobOutcome
from contract.events import JobProgress, WorkerState
from contract.images import Txt2ImgRequest
from contract.worker import ArtifactMessage, JobEventMessage, RunJob
from pipelines.job_control import JobControl

SMALL = {"width": 64, "height": 64, "steps": 2}


class ScriptedRuntime:
    """Stands in for a worker's engines: records the order of jobs, can block until released, and
    reports through the same contract messages as the real runtime."""

    worker_id = "scripted"
    device = "cpu"

    def __init__(self) -> None:
        self.order: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def state(self) -> WorkerState:
        return WorkerState(worker=self.worker_id, device=self.device, kind="in-process")

    def run(self, message: RunJob, send: Any, control: JobControl) -> JobOutcome:
        prompt = message.request["prompt"]
        self.order.append(prompt)
        for step in range(1, 4):
            send(
                JobEventMessage(
                    job_id=message.job_id, progress=JobProgress(stage="sampling", step=step, steps=3)
                )
            )
            while not self.release.wait(0.05):
                if control.interrupted:
                    return JobOutcome(state="cancelled", error="Interrupted before any image was finished.")
        artifact = Artifact(kind="image", folder="txt2img", extension="png", data=prompt.encode(), seed=1)
        send(ArtifactMessage(job_id=message.job_id, artifact=artifact))
        return JobOutcome(state="done", info={"images": [artifact.ref]}, artifacts=[artifact.ref])


def make_queue(tmp_path: Path, **kwargs: Any) -> tuple[JobQueue, ScriptedRuntime]:
    runtime = ScriptedRuntime()
    pool = WorkerPool([InProcessWorkerHandle(runtime)])  # type: ignore[arg-type]
    queue = JobQueue(JobStore(tmp_path / "jobs.sqlite3"), pool, outputs_root=tmp_path / "outputs", **kwargs)
    return queue, runtime


def test_jobs_run_and_report_results(tmp_path: Path) -> None:
    queue, _ = make_queue(tmp_path)
    queue.start()
    try:
        job = queue.submit(Txt2ImgRequest(prompt="alpha", **SMALL))
        status = queue.wait(job, timeout=30)
        assert status.state == "done"
        [path] = status.images
        assert Path(path).read_bytes() == b"alpha"  # the head wrote the worker's artifact
        assert Path(path).parent.parent == tmp_path / "outputs" / "txt2img-images"
        assert status.info == {"images": [path]}
        assert status.progress == 1.0
    finally:
        queue.stop()


def test_fair_order_between_users(tmp_path: Path) -> None:
    queue, executor = make_queue(tmp_path)
    executor.release.clear()
    ids = [queue.submit(Txt2ImgRequest(prompt=f"a{i}", **SMALL), owner="alice") for i in range(3)]
    ids += [queue.submit(Txt2ImgRequest(prompt=f"b{i}", **SMALL), owner="bob") for i in range(2)]
    assert queue.status(ids[3]).position == 2  # bob's first job runs right after alice's first
    queue.start()
    try:
        executor.release.set()
        for job in ids:
            queue.wait(job, timeout=30)
        assert executor.order == ["a0", "b0", "a1", "b1", "a2"]
    finally:
        queue.stop()


def test_full_queue_is_refused(tmp_path: Path) -> None:
    queue, _ = make_queue(tmp_path, max_queued=2)
    queue.submit(Txt2ImgRequest(prompt="1", **SMALL))
    queue.submit(Txt2ImgRequest(prompt="2", **SMALL))
    with pytest.raises(QueueFullError, match="queue is full"):
        queue.submit(Txt2ImgRequest(prompt="3", **SMALL))


def test_cancel_queued_and_interrupt_running(tmp_path: Path) -> None:
    queue, executor = make_queue(tmp_path)
    executor.release.clear()
    running = queue.submit(Txt2ImgRequest(prompt="long", **SMALL))
    waiting = queue.submit(Txt2ImgRequest(prompt="later", **SMALL))
    queue.start()
    try:
        while queue.status(running).state != "running":
            queue.wait(running, timeout=0.05)
        assert queue.cancel(waiting)
        assert queue.status(waiting).state == "cancelled"
        assert queue.cancel(running)
        assert queue.wait(running, timeout=30).state == "cancelled"
        assert executor.order == ["long"]
    finally:
        queue.stop()


def test_restart_requeues_running_jobs_and_removes_partial_outputs(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    done = store.add("local", "txt2img", Txt2ImgRequest(prompt="done", **SMALL).model_dump(mode="json"))
    store.claim_next()
    store.finish(done, "done", result={"images": ["kept.png"]})
    crashed = store.add("local", "txt2img", Txt2ImgRequest(prompt="crashed", **SMALL).model_dump(mode="json"))
    store.claim_next()
    partial = tmp_path / "partial.png"
    partial.write_bytes(b"half")
    store.record_output(crashed, str(partial))
    store.close()  # the process dies here

    queue, executor = make_queue(tmp_path)
    queue.start()
    try:
        assert queue.wait(crashed, timeout=30).state == "done"
        assert queue.status(crashed).attempts == 2
        assert not partial.exists()
        assert executor.order == ["crashed"]  # the finished job is not run again
        assert queue.status(done).images == ["kept.png"]
    finally:
        queue.stop()


def test_real_engine_through_the_queue(studio) -> None:
    queue = studio.start_queue()
    job = queue.submit(Txt2ImgRequest(prompt="through the queue", seed=4, **SMALL), owner="tester")
    status = queue.wait(job, timeout=300)
    assert status.state == "done", status.error
    assert Path(status.images[0]).is_file()
    assert status.info["all_seeds"] == [4]
    bad = queue.submit(Txt2ImgRequest(prompt="x", **SMALL, override_settings={"sd_model_checkpoint": "nope"}))
    failed = queue.wait(bad, timeout=60)
    assert failed.state == "failed"
    assert "'nope' not found" in failed.error


def test_a_job_that_keeps_stopping_the_studio_fails_after_the_bound(tmp_path: Path) -> None:
    """The OOM-killed job: recorded as running twice, it is failed at the next start, not rerun."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    job = store.add("local", "txt2img", Txt2ImgRequest(prompt="huge", **SMALL).model_dump(mode="json"))
    for _ in range(2):  # two starts, each killed mid-job
        store.claim_next()
        store.close()
        store = JobStore(tmp_path / "jobs.sqlite3")
        if store.get(job).attempts < 2:
            store.recover(max_attempts=2)
    store.close()
    queue, runtime = make_queue(tmp_path, max_attempts=2)
    queue.start()
    try:
        status = queue.status(job)
        assert status.state == "failed"
        assert "stopped its worker 2 times" in status.error and "out of memory" in status.error
        assert runtime.order == []
        later = queue.submit(Txt2ImgRequest(prompt="fine", **SMALL))  # the studio serves on
        assert queue.wait(later, timeout=30).state == "done"
    finally:
        queue.stop()
