"""``/studio/v1/jobs``: accepted at once with an id, followed over SSE, results served as files."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import requests
from PIL import Image

from tests.api.conftest import SMALL, StudioServer


def read_events(session: requests.Session, url: str) -> list[tuple[str, dict[str, Any]]]:
    """All events of a job's SSE stream (it ends by itself with the ``end`` event)."""
    events: list[tuple[str, dict[str, Any]]] = []
    with session.get(url, stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_job_is_accepted_at_once_then_streams_progress_and_links_its_result(
    studio_server: StudioServer, alice: requests.Session
) -> None:
    url = studio_server.url
    accepted = alice.post(
        url + "/studio/v1/jobs", json={"mode": "txt2img", "prompt": "a boat", "seed": 21, **SMALL}
    )
    assert accepted.status_code == 202
    job = accepted.json()
    assert job["state"] in ("queued", "running") and len(job["id"]) == 32
    events = read_events(alice, url + job["links"]["events"] + "?previews=true")
    names = [name for name, _ in events]
    assert names[-1] == "end" and set(names[:-1]) <= {"progress"}
    final = events[-1][1]
    assert final["state"] == "done" and final["progress"] == 1.0
    assert final["attempts"] == 1 and final["worker"] is None  # finished: no worker runs it now
    assert final["info"]["all_seeds"] == [21]
    fractions = [data["progress"] for name, data in events if name == "progress" and "progress" in data]
    assert fractions == sorted(fractions)  # a tiny job may finish between two polls: no step count required
    for name, data in events:
        if name == "progress" and data.get("preview"):
            Image.open(io.BytesIO(base64.b64decode(data["preview"]))).verify()
    status = alice.get(url + job["links"]["self"]).json()
    assert status == final
    (link,) = status["links"]["images"]
    image = alice.get(url + link)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).info["parameters"].startswith("a boat\nSteps: 2")


def test_img2img_job_takes_raw_base64_without_a_data_prefix(
    studio_server: StudioServer, alice: requests.Session
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    raw = base64.b64encode(buffer.getvalue()).decode()
    body = {"mode": "img2img", "init_images": [raw], "denoising_strength": 0.5, "seed": 4, **SMALL}
    job = alice.post(studio_server.url + "/studio/v1/jobs", json=body).json()
    final = read_events(alice, studio_server.url + job["links"]["events"])[-1][1]
    assert final["state"] == "done", final


def test_cancel_a_running_job_and_other_users_cannot_see_it(
    studio_server: StudioServer, alice: requests.Session, bob: requests.Session
) -> None:
    url = studio_server.url
    job = alice.post(
        # Thousands of steps: far more than can run between the first step event and the cancel,
        # however fast or slow this machine is.
        url + "/studio/v1/jobs",
        json={"mode": "txt2img", "prompt": "x", **{**SMALL, "steps": 150, "n_iter": 30}},
    )
    job_id = job.json()["id"]
    assert bob.get(f"{url}/studio/v1/jobs/{job_id}").status_code == 404
    assert bob.delete(f"{url}/studio/v1/jobs/{job_id}").status_code == 404
    assert job_id not in {j["id"] for j in bob.get(url + "/studio/v1/jobs").json()["jobs"]}
    assert job_id in {j["id"] for j in alice.get(url + "/studio/v1/jobs").json()["jobs"]}
    with alice.get(f"{url}/studio/v1/jobs/{job_id}/events", stream=True, timeout=120) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data: ") and json.loads(line[6:]).get("step"):
                break  # sampling has started
    cancelled = alice.delete(f"{url}/studio/v1/jobs/{job_id}")
    assert cancelled.status_code == 200
    final = read_events(alice, f"{url}/studio/v1/jobs/{job_id}/events")[-1][1]
    assert final["state"] == "cancelled"
    assert alice.delete(f"{url}/studio/v1/jobs/{job_id}").status_code == 409
    assert alice.get(f"{url}/studio/v1/jobs/{'0' * 32}").status_code == 404


def test_blocking_a1111_calls_are_jobs_too(studio_server: StudioServer, alice: requests.Session) -> None:
    url = studio_server.url
    response = alice.post(url + "/sdapi/v1/txt2img", json={"prompt": "a kite", "seed": 2, **SMALL})
    assert response.status_code == 200
    job_id = response.headers["X-Job-Id"]
    info = json.loads(response.json()["info"])
    assert info["job_id"] == job_id
    # A1111 1.10's Processed.js() keys, which bots and plugins read (issue 14).
    assert info["index_of_first_image"] == 0
    assert info["sd_model_name"] and len(info["sd_model_hash"]) == 10
    assert "sd_vae_name" in info and "sd_vae_hash" in info
    assert info["styles"] == [] and not info["restore_faces"] and info["face_restoration_model"] is None
    assert info["seed_resize_from_w"] == -1 and info["seed_resize_from_h"] == -1
    assert isinstance(info["extra_generation_params"], dict)
    assert info["is_using_inpainting_conditioning"] is False
    status = alice.get(f"{url}/studio/v1/jobs/{job_id}").json()
    assert status["state"] == "done" and status["kind"] == "txt2img"


def test_validation_errors_name_the_fields_of_the_kind_sent(
    studio_server: StudioServer, alice: requests.Session
) -> None:
    url = f"{studio_server.url}/studio/v1/jobs"
    txt = alice.post(url, json={"prompt": "x", "steps": 0})
    assert txt.status_code == 422
    assert [e["loc"][-1] for e in txt.json()["detail"]] == ["steps"]
    assert "txt2img.steps" in txt.json()["errors"]
    img = alice.post(url, json={"init_images": ["abc"], "denoising_strength": 2})
    assert img.status_code == 422 and "img2img.denoising_strength" in img.json()["errors"]
    assert "txt2img" not in img.json()["errors"]
    unknown = alice.post(url, json={"mode": "paint", "prompt": "x"})
    assert unknown.status_code == 422 and "paint" in unknown.text
