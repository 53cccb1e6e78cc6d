"""kill -9 in the middle of a job, restart: every job ends exactly once, with its image on disk."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.api.conftest import StudioServer
from tests.api.test_jobs_api import read_events

# Job 1 makes two images one after the other and is killed between them: its first image is on
# disk but the job is not finished. Jobs 2 and 3 are still waiting then; job 0 is already done.
SEEDS = [100, 200, 300, 400]
EXPECTED_SEEDS = [100, 200, 201, 300, 400]
SECOND_IMAGE_SECONDS = 4.0  # how long job 1's second image should take, to kill it reliably


@pytest.fixture()
def crashing_server(api_models_root: Path, tmp_path: Path) -> StudioServer:
    return StudioServer(
        args=[
            "--nowebui",
            "--models-dir",
            str(api_models_root),
            "--data-dir",
            str(tmp_path / "data"),
            "--outputs-dir",
            str(tmp_path / "outputs"),
            "--ckpt",
            "tiny-sd1",
        ],
        work=tmp_path,
    )


def submit(session: requests.Session, server: StudioServer, index: int, **fields: Any) -> str:
    body = {"mode": "txt2img", "prompt": f"job {index}", "seed": SEEDS[index], "width": 64, "height": 64}
    accepted = session.post(server.url + "/studio/v1/jobs", json={**body, **fields})
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["id"])


def seconds_per_step(events: list[tuple[str, dict[str, Any]]]) -> float:
    """From the server's ETA during a finished job (0.01 s when it was too fast to report one)."""
    estimates = [
        data["eta_seconds"] / (data["steps"] - data["step"])
        for name, data in events
        if name == "progress" and data.get("eta_seconds") and 0 < data["step"] < data["steps"]
    ]
    return max(estimates[-1], 0.01) if estimates else 0.01


def wait_for_a_partial_result(session: requests.Session, server: StudioServer, job_id: str) -> None:
    """Follow the job's event stream until it has saved its first image but is still running."""
    with session.get(f"{server.url}/studio/v1/jobs/{job_id}/events", stream=True, timeout=300) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["state"] in ("queued", "running"), event
                if event.get("images"):
                    return
    raise AssertionError(f"job {job_id} ended before it could be killed half-way")


@pytest.mark.slow
def test_jobs_survive_kill_9_exactly_once(crashing_server: StudioServer, tmp_path: Path) -> None:
    server = crashing_server
    session = requests.Session()
    server.start()
    try:
        ids = [submit(session, server, 0, steps=6)]
        first_events = read_events(session, f"{server.url}/studio/v1/jobs/{ids[0]}/events")
        finished_before = first_events[-1][1]
        assert finished_before["state"] == "done"
        # Enough steps that the second image of job 1 takes a while on this machine, fast or busy.
        steps = min(80, max(4, math.ceil(SECOND_IMAGE_SECONDS / seconds_per_step(first_events))))
        ids.append(submit(session, server, 1, steps=steps, n_iter=2))
        ids += [submit(session, server, index, steps=2) for index in (2, 3)]
        wait_for_a_partial_result(session, server, ids[1])
    finally:
        server.kill()

    server.start()
    try:
        finals = {
            job: read_events(session, f"{server.url}/studio/v1/jobs/{job}/events")[-1][1] for job in ids
        }
    finally:
        server.stop()

    assert finals[ids[0]]["links"]["images"] == finished_before["links"]["images"]  # kept, not rerun
    for job_id, seed, count in zip(ids, SEEDS, (1, 2, 1, 1), strict=True):
        final = finals[job_id]
        assert final["state"] == "done", final
        assert final["info"]["all_seeds"] == [seed + i for i in range(count)]
        assert all(Path(path).is_file() for path in final["info"]["images"])
    images = [p for p in (tmp_path / "outputs").rglob("*.png") if not p.name.startswith(".")]
    assert sorted(int(p.stem.split("-")[1]) for p in images) == EXPECTED_SEEDS  # each image once
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        attempts = dict(db.execute("SELECT id, attempts FROM jobs").fetchall())
    assert [attempts[job_id] for job_id in ids] == [1, 2, 1, 1]  # only the killed job ran twice
