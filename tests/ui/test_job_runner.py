"""What a user reads while jobs run: queue position, model loading, steps with ETA, previews,
images as they are saved, and readable errors (never a traceback)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from app.jobs.queue import JobStatus
from app.ui.job_runner import (
    JobRunner,
    TabSession,
    describe_status,
    format_eta,
    job_owner,
    progress_html,
    user_message,
)
from contract.images import Txt2ImgRequest
from pipelines.errors import OutOfMemoryError

BASE = JobStatus(
    id="job-1",
    owner="alice",
    kind="txt2img",
    state="queued",
    position=2,
    progress=0.0,
    step=0,
    steps=0,
    eta_seconds=None,
    message="",
    images=[],
    info=None,
    error=None,
)


def test_status_lines() -> None:
    assert describe_status(BASE) == "Queued: position 2"
    running = replace(BASE, state="running", position=None)
    assert describe_status(running) == "Starting..."
    assert describe_status(replace(running, message="Loading model tiny.safetensors...")) == (
        "Loading model tiny.safetensors..."
    )
    stepping = replace(
        running, message="Loading model tiny.safetensors...", step=7, steps=20, eta_seconds=3.2
    )
    assert describe_status(stepping) == "Step 7/20, ETA 3s"
    second_batch = replace(stepping, progress=(1 + 7 / 20) / 3)
    assert describe_status(second_batch, batches=3) == "Batch 2/3, Step 7/20, ETA 3s"
    assert describe_status(replace(BASE, state="cancelled")) == "Interrupted"
    assert describe_status(replace(BASE, state="failed", error="The GPU ran out of memory.")) == (
        "Error: The GPU ran out of memory."
    )
    assert format_eta(75) == "1m 15s"


def test_progress_html_escapes_what_it_shows() -> None:
    html = progress_html("Error: prompt '<script>'", 0.5, "failed")
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_owner_is_the_login_or_the_browser_session() -> None:
    assert job_owner(SimpleNamespace(username="alice", session_hash="abc")) == "alice"
    assert job_owner(SimpleNamespace(username=None, session_hash="abc")) == "session-abc"
    assert job_owner(None) == "local"


def test_user_messages(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValidationError) as bad_size:
        Txt2ImgRequest(width=100)
    assert user_message(bad_size.value) == "width: must be a multiple of 8 (try 96 or 104)"
    assert user_message(OutOfMemoryError("Try a smaller size.")) == "Try a smaller size."
    with caplog.at_level(logging.ERROR):
        text = user_message(KeyError("internal detail"))
    assert text.startswith("Something went wrong (KeyError)") and "internal detail" not in text
    assert "internal detail" in caplog.text  # the details go to the server log


class ScriptedQueue:
    """Answers ``wait`` with the next status of each job's script (the last one repeats)."""

    def __init__(self, scripts: dict[str, list[JobStatus]]) -> None:
        self.scripts = scripts
        self.cancelled: list[str] = []
        self.skipped: list[str] = []
        self.submitted: list[tuple[Any, str]] = []

    def submit(self, request: Any, *, owner: str) -> str:
        self.submitted.append((request, owner))
        return list(self.scripts)[len(self.submitted) - 1]

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        script = self.scripts[job_id]
        return script.pop(0) if len(script) > 1 else script[0]

    def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True

    def skip(self, job_id: str) -> None:
        self.skipped.append(job_id)

    def running_ids(self) -> list[str]:
        return list(self.scripts)[:1]


def _runner(queue: ScriptedQueue, tmp_path: Path) -> JobRunner:
    services = SimpleNamespace(
        queue=queue,
        start_queue=lambda: queue,
        settings=SimpleNamespace(live_preview_every=2, live_preview="cheap"),
    )
    return JobRunner(services)  # type: ignore[arg-type]


def _jpeg() -> bytes:
    """A preview as a worker sends it (each call a new object, as each new preview is)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="JPEG")
    return buffer.getvalue()


def _saved_png(path: Path, infotext: str) -> str:
    from PIL import Image

    from pipelines.outputs.saving import encode_image

    path.write_bytes(encode_image(Image.new("RGB", (8, 8)), ".png", infotext))
    return str(path)


def test_follow_reports_each_stage_then_the_images(tmp_path: Path) -> None:
    first = _saved_png(tmp_path / "a.png", "a cat\nSteps: 4, Sampler: Euler, Seed: 11, Size: 8x8")
    second = _saved_png(tmp_path / "b.png", "a cat\nSteps: 4, Sampler: Euler, Seed: 12, Size: 8x8")
    running = replace(BASE, state="running", position=None)
    early = _jpeg()  # the worker sent no preview at step 1 (every 2 steps)
    script = [
        BASE,
        replace(BASE, position=1),
        replace(running, message="Loading model tiny..."),
        replace(running, step=1, steps=4, progress=0.25),
        replace(running, step=2, steps=4, progress=0.5, eta_seconds=2.0, preview=early),
        replace(running, step=4, steps=4, progress=1.0, images=[first], preview=_jpeg()),
        replace(
            BASE,
            state="done",
            position=None,
            progress=1.0,
            images=[first, second],
            info={
                "images": [first, second],
                "infotexts": ["one", "two"],
                "all_seeds": [11, 12],
                "notes": ["n"],
            },
        ),
    ]
    queue = ScriptedQueue({"job-1": script})
    runner = _runner(queue, tmp_path)
    session = TabSession()
    runner.submit(session, [Txt2ImgRequest(prompt="a cat")], owner="alice")
    updates = list(runner.follow(session))
    texts = [u.text for u in updates]
    assert texts == [
        "Queued: position 2",
        "Queued: position 1",
        "Loading model tiny...",
        "Step 1/4",
        "Step 2/4, ETA 2s",
        "Step 4/4",
        "Done: 2 images",
    ]
    previews = [u.preview is not None for u in updates]
    assert previews == [False, False, False, False, True, True, False]  # each new preview once
    assert updates[4].preview.size == (16, 16)
    assert updates[5].images_changed  # the first image shows before the job ends
    assert [(i.path, i.infotext, i.seed) for i in session.images] == [(first, "one", 11), (second, "two", 12)]
    assert session.last_seed == 11 and session.notes == ["n"]
    assert queue.submitted[0][1] == "alice"


def test_failed_and_interrupted_jobs(tmp_path: Path) -> None:
    failed = replace(BASE, state="failed", position=None, error="No face found in the image.")
    runner = _runner(ScriptedQueue({"job-1": [failed]}), tmp_path)
    session = TabSession()
    session.start(["job-1"])
    final = list(runner.follow(session))[-1]
    assert (final.state, final.error) == ("failed", "No face found in the image.")

    queue = ScriptedQueue({"job-1": [replace(BASE, state="cancelled")], "job-2": [BASE]})
    runner = _runner(queue, tmp_path)
    session.start(["job-1", "job-2"])
    runner.interrupt(session)
    final = list(runner.follow(session))[-1]
    assert final.text == "Interrupted (0 images kept)"
    assert queue.cancelled == ["job-1", "job-2"]  # the running job and the waiting one
    runner.skip(session)
    assert queue.skipped == ["job-1"]


def test_previews_continue_into_the_next_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker renders a preview every ``preview_every`` steps, counting again in each batch."""
    import app.workers.runtime as runtime_module
    from app.workers.runtime import _ProgressReporter
    from contract.worker import RunJob
    from pipelines.job_control import ProgressEvent

    monkeypatch.setattr(runtime_module, "PREVIEW_MIN_INTERVAL", 0.0)
    runtime = SimpleNamespace(worker_id="w", device="cpu", encode_preview=lambda latents, **_: b"jpeg")
    sent: list[Any] = []
    message = RunJob(job_id="job-1", request={}, preview_mode="cheap", preview_every=2)
    reporter = _ProgressReporter(runtime, message, sent.append, sdxl=False)  # type: ignore[arg-type]
    latents = torch.zeros(1, 4, 2, 2)
    for batch, step in ((0, 2), (0, 4), (1, 1), (1, 2)):
        reporter(
            ProgressEvent(
                stage="sampling", step=step, steps=4, batch_index=batch, batch_count=2, latents=latents
            )
        )
    assert [m.progress.preview is not None for m in sent] == [True, True, False, True]
    assert [m.progress.worker for m in sent] == ["w"] * 4
