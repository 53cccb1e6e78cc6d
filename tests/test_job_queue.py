"""The durable job queue: results, fairness, limits, cancel/interrupt and crash recovery."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from app.jobs.queue import JobQueue, QueueFullError
from app.jobs.store import JobStore
from contract.images import Txt2ImgRequest
from pipelines.errors import GenerationInterruptedError
from pipelines.generation.engine import GenerationResult, SavedImage
from pipelines.job_control import JobControl, ProgressEvent

SMALL = {"width": 64, "height": 64, "steps": 2}


class ScriptedExecutor:
    """Stands in for the engine: records the order of jobs, can block until released."""

    def __init__(self, tmp_path: Path) -> None:
        self.order: list[str] = []
        self.release = threading.Event()
        self.release.set()
        self.tmp_path = tmp_path

    def execute(self, request: Any, *, control: JobControl | None = None, on_progress: Any = None) -> Any:
        self.order.append(request.prompt)
        control = control or JobControl()
        for step in range(1, 4):
            if on_progress:
                on_progress(ProgressEvent(stage="sampling", step=step, steps=3))
            while not self.release.wait(0.05):
                if control.interrupted:
                    raise GenerationInterruptedError("Interrupted before any image was finished.")
        path = self.tmp_path / f"{request.prompt}.png"
        path.write_bytes(b"png")
        if on_progress:
            on_progress(ProgressEvent(stage="saved", message=str(path)))
        from PIL import Image

        image = SavedImage(path=path, seed=1, subseed=1, infotext="x", image=Image.new("RGB", (8, 8)))
        return GenerationResult(images=[image], request=request)


def make_queue(tmp_path: Path, **kwargs: Any) -> tuple[JobQueue, ScriptedExecutor]:
    executor = ScriptedExecutor(tmp_path)
    return JobQueue(JobStore(tmp_path / "jobs.sqlite3"), executor, **kwargs), executor


def test_jobs_run_and_report_results(tmp_path: Path) -> None:
    queue, _ = make_queue(tmp_path)
    queue.start()
    try:
        job = queue.submit(Txt2ImgRequest(prompt="alpha", **SMALL))
        status = queue.wait(job, timeout=30)
        assert status.state == "done"
        assert status.images == [str(tmp_path / "alpha.png")]
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
