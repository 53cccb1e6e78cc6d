# ruff: noqa: F811 (pytest fixtures imported below are requested by parameters of the same name)
"""``POST /studio/v1/jobs`` with ``mode: talking_head``: files as base64 (never paths), the MP4 and its
sidecar linked and served, uploads staged and removed, a running job interrupted.

In-process (as ``test_queue_api.py``) over the random-weight SadTalker files, so the face generator
can be swapped for the cheap stand-in after loading (a real one costs ~15 s a frame on CI CPUs);
the stand-in here can also hold a job in its render stage until the test lets it go.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.services import StudioServices
from app.settings import StudioSettings

# The talking-head fixtures, shared with tests/sadtalker (imported fixtures are used by parameter name).
from tests.sadtalker.conftest import astronaut_png, media_dir, sadtalker_models_root, speech_wav  # noqa: F401
from tests.sadtalker.helpers import GatedGenerator, files_in, probe

USERS = {"alice": "a-pass", "bob": "b-pass"}
ALICE = ("alice", USERS["alice"])
MAX_UPLOAD_MB = 2


@dataclass
class TalkingHeadApi:
    client: TestClient
    services: StudioServices
    generator: GatedGenerator

    @property
    def outputs(self) -> Path:
        return self.services.settings.outputs_dir / "talking-head"

    @property
    def uploads(self) -> Path:
        return self.services.uploads.root


@pytest.fixture(scope="module")
def api(sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TalkingHeadApi]:
    from app.api import build_api_app

    work = tmp_path_factory.mktemp("talking-head-api")
    settings = StudioSettings(
        models_dir=sadtalker_models_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        max_upload_mb=MAX_UPLOAD_MB,
        in_process_workers=True,  # the gated generator below is swapped into this process's engine
        device_ids=["cpu"],
    )
    services = StudioServices.create(settings)
    assert services.executor.talking_head is not None
    generator = GatedGenerator()
    services.executor.talking_head.engine.models(256).generator = generator
    services.start_queue()
    client = TestClient(build_api_app(services, credentials=list(USERS.items())))
    try:
        yield TalkingHeadApi(client, services, generator)
    finally:
        generator.gate.set()
        services.queue.stop()


def as_base64(path: Path, mime: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{mime};base64,{data}" if mime else data


@pytest.fixture(scope="module")
def body(astronaut_png: Path, speech_wav: Path) -> dict[str, Any]:
    """A portrait as a data: URL, the speech as bare base64 (both are accepted)."""
    return {
        "mode": "talking_head",
        "image": as_base64(astronaut_png, "image/png"),
        "audio": as_base64(speech_wav),
        "pose_style": 3,
        "still": True,
        "batch_size": 8,
        "seed": 7,
    }


def read_events(
    client: TestClient, url: str, on_progress: Callable[[dict[str, Any]], None] = lambda data: None
) -> list[tuple[str, dict[str, Any]]]:
    """Every event of a job's SSE stream (it ends by itself with ``end``)."""
    events: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", url, auth=ALICE) as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "progress":
                    on_progress(events[-1][1])
    return events


def refusal(response: Any) -> str:
    assert response.status_code == 422, response.text
    return str(response.json()["errors"])


def test_base64_portrait_and_speech_become_a_downloadable_mp4(
    api: TalkingHeadApi, body: dict[str, Any], tmp_path: Path
) -> None:
    orphan = api.uploads / ("0" * 32)  # a folder whose job never ran (e.g. a crash): pruned on submit
    orphan.mkdir(parents=True)
    (orphan / "portrait.png").write_bytes(b"x")

    api.generator.gate.clear()  # held in its render stage until the stream has shown that stage
    try:
        accepted = api.client.post("/studio/v1/jobs", json=body, auth=ALICE)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["state"] in ("queued", "running") and not orphan.exists()

        def release_once_rendering(data: dict[str, Any]) -> None:
            if data["message"] == "render":
                api.generator.gate.set()

        events = read_events(api.client, job["links"]["events"], release_once_rendering)
    finally:
        api.generator.gate.set()
    final = events[-1][1]
    assert events[-1][0] == "end" and final["state"] == "done", final
    stages = [data["message"] for name, data in events if name == "progress"]
    assert "render" in stages, stages  # the stage a job is in reaches SSE clients

    view = api.client.get(job["links"]["self"], auth=ALICE).json()
    assert view["kind"] == "talking_head" and view["links"]["images"] == []
    (video_link,) = view["links"]["videos"]
    (sidecar_link,) = view["links"]["sidecars"]
    video = api.client.get(video_link, auth=ALICE)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    (tmp_path / "result.mp4").write_bytes(video.content)
    info = probe(tmp_path / "result.mp4")
    assert info["video_codec"] == "h264" and info["audio_codecs"] == ["aac"] and info["width"] == 256
    assert info["frames"] in (None, view["info"]["frames"])
    sidecar = api.client.get(sidecar_link, auth=ALICE).json()
    assert sidecar["parameters"]["pose_style"] == 3 and sidecar["parameters"]["seed"] == 7
    assert sidecar["parameters"]["still"] is True
    assert Path(sidecar["parameters"]["image"]).name == "portrait.png"  # a name the server chose
    assert files_in(api.uploads) == []  # the staged copies went when the job ended


@pytest.mark.parametrize("field", ["image", "audio", "ref_pose"])
def test_a_server_path_instead_of_base64_is_refused(
    api: TalkingHeadApi,
    body: dict[str, Any],
    astronaut_png: Path,
    field: str,
) -> None:
    before = api.services.queue.store.active_requests(kind="talking_head")
    for path in (
        str(astronaut_png),
        "/etc/hostname",
        "file:///etc/hostname",
        "C:\\photos\\me.png",
        "~/me.png",
    ):
        errors = refusal(api.client.post("/studio/v1/jobs", json={**body, field: path}, auth=ALICE))
        assert errors.startswith(f"{field}: file paths are not accepted over the API"), errors
    assert api.services.queue.store.active_requests(kind="talking_head") == before
    assert files_in(api.uploads) == []


def test_unusable_files_are_422_naming_the_field(
    api: TalkingHeadApi,
    body: dict[str, Any],
    speech_wav: Path,
    astronaut_png: Path,
) -> None:
    post = api.client.post
    errors = refusal(post("/studio/v1/jobs", json={**body, "image": as_base64(speech_wav)}, auth=ALICE))
    # Checked when the request is built, as every image input is (the kind sent names the model).
    assert errors.startswith("talking_head: image: not an image file"), errors
    errors = refusal(post("/studio/v1/jobs", json={**body, "image": "not base64 at all!"}, auth=ALICE))
    assert errors.startswith("image: not base64 data"), errors
    errors = refusal(post("/studio/v1/jobs", json={**body, "audio": as_base64(astronaut_png)}, auth=ALICE))
    assert errors.startswith("audio: The file has no audio track. Choose a speech recording"), errors
    text = base64.b64encode(b"these words are not a recording").decode()
    errors = refusal(post("/studio/v1/jobs", json={**body, "audio": text}, auth=ALICE))
    assert errors.startswith("audio: The file could not be read as audio"), errors
    errors = refusal(post("/studio/v1/jobs", json={**body, "audio": "data:audio/wav;base64,"}, auth=ALICE))
    assert errors.startswith("audio: the file is empty"), errors
    errors = refusal(post("/studio/v1/jobs", json={**body, "ref_eyeblink": ""}, auth=ALICE))
    assert errors.startswith("ref_eyeblink: expected a file"), errors
    assert files_in(api.uploads) == []


def test_auth_size_limit_other_users_and_waiting_jobs(api: TalkingHeadApi, body: dict[str, Any]) -> None:
    assert api.client.post("/studio/v1/jobs", json=body).status_code == 401
    too_big = {**body, "audio": base64.b64encode(bytes(MAX_UPLOAD_MB * 1024 * 1024)).decode()}
    assert api.client.post("/studio/v1/jobs", json=too_big, auth=ALICE).status_code == 413
    bob = ("bob", USERS["bob"])
    api.generator.rendering.clear()
    api.generator.gate.clear()
    try:
        running = api.client.post("/studio/v1/jobs", json=body, auth=ALICE).json()["id"]
        assert api.generator.rendering.wait(120)
        assert api.client.get(f"/studio/v1/jobs/{running}", auth=bob).status_code == 404
        assert api.client.delete(f"/studio/v1/jobs/{running}", auth=bob).status_code == 404
        # Staging a job prunes unused uploads: those of the running and the waiting jobs stay.
        waiting = [
            api.client.post("/studio/v1/jobs", json=body, auth=who).json()["id"] for who in (ALICE, bob)
        ]
        assert len(list(api.uploads.iterdir())) == 3
    finally:
        api.generator.gate.set()
    for job_id in (running, *waiting):
        assert api.services.queue.wait(job_id, timeout=120).state == "done"
    assert files_in(api.uploads) == []


def test_cancelling_a_running_job_stops_it_and_keeps_no_file(
    api: TalkingHeadApi, body: dict[str, Any]
) -> None:
    before = files_in(api.outputs)
    api.generator.rendering.clear()
    api.generator.gate.clear()
    try:
        job_id = api.client.post("/studio/v1/jobs", json=body, auth=ALICE).json()["id"]
        assert api.generator.rendering.wait(120), "the job never reached its render stage"
        assert api.services.queue.status(job_id).state == "running"
        cancelled = api.client.delete(f"/studio/v1/jobs/{job_id}", auth=ALICE)
        assert cancelled.status_code == 200, cancelled.text
    finally:
        api.generator.gate.set()
    final = api.services.queue.wait(job_id, timeout=120)
    assert final.state == "cancelled", final
    assert final.error is not None and "interrupted during render" in final.error
    view = api.client.get(f"/studio/v1/jobs/{job_id}", auth=ALICE).json()
    assert view["links"]["videos"] == [] and view["links"]["sidecars"] == []
    assert files_in(api.outputs) == before  # no MP4, sidecar or temporary file was left
    assert files_in(api.uploads) == []
