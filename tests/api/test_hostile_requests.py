"""Hostile requests answered in the API process, before any job exists (issue 14): oversized images
and factors, wrongly typed ``override_settings``, and output files of another user.

The API app runs in this process (no server, no model) with the job queue's ``submit`` replaced by
one that fails the test: a refusal must come from the request models, never from a job.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.api.conftest import API_USERS

SMALL = {"width": 64, "height": 64, "steps": 1}


def png_base64(width: int, height: int, mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def huge_png() -> str:
    """The issue's 17 KB request body: a 12000x12000 1-bit PNG."""
    return png_base64(12000, 12000, mode="1")


def build_client(tmp_path: Path, *, auth: bool = True, share_outputs: bool = False) -> tuple[TestClient, Any]:
    from app.api import build_api_app
    from app.services import StudioServices
    from app.settings import StudioSettings

    settings = StudioSettings(
        data_dir=tmp_path / "data",
        outputs_dir=tmp_path / "outputs",
        models_dir=tmp_path / "models",
        share_outputs=share_outputs,
    )
    services = StudioServices.create(settings)
    credentials = list(API_USERS.items()) if auth else []
    return TestClient(
        build_api_app(services, credentials=credentials), raise_server_exceptions=False
    ), services


@pytest.fixture()
def no_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches the job queue."""
    from app.jobs.queue import JobQueue

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a hostile request reached the job queue")

    monkeypatch.setattr(JobQueue, "submit", refuse)


@pytest.fixture()
def client(tmp_path: Path, no_jobs: None) -> Iterator[TestClient]:
    test_client, _ = build_client(tmp_path)
    test_client.auth = ("alice", API_USERS["alice"])
    with test_client:
        yield test_client


def test_the_17_kb_extras_request_is_refused_without_a_job(client: TestClient, huge_png: str) -> None:
    assert len(base64.b64decode(huge_png)) < 20_000
    body = {"image": huge_png, "upscaling_resize": 8, "upscaler_1": "Lanczos"}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"].startswith("image: the image 12000x12000")
    assert "megapixels" in response.json()["errors"]
    batch = client.post(
        "/sdapi/v1/extra-batch-images",
        json={
            "imageList": [{"data": huge_png, "name": "x.png"}],
            "upscaling_resize": 8,
            "upscaler_1": "Lanczos",
        },
    )
    assert batch.status_code == 422 and "12000x12000" in batch.text


def test_oversized_init_image_mask_and_factors_are_refused(
    client: TestClient, huge_png: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = png_base64(64, 64)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/sdapi/v1/img2img", {**SMALL, "init_images": [huge_png]}, "init_images.0: the image 12000x12000"),
        ("/sdapi/v1/img2img", {**SMALL, "init_images": [small], "mask": huge_png}, "mask: "),
        ("/studio/v1/jobs", {"mode": "img2img", **SMALL, "init_images": [huge_png]}, "init_images.0: "),
        ("/studio/v1/jobs", {"mode": "extras", "image": huge_png}, "image: "),
    ]
    for path, body, words in cases:
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert words in response.json()["errors"], (path, response.json()["errors"])
    monkeypatch.setenv("SDSTUDIO_MAX_PIXELS", "1000000")
    limited = [
        ("/sdapi/v1/txt2img", {**SMALL, "enable_hr": True, "hr_resize_x": 2048}, "hr_resize_x: "),
        (
            "/sdapi/v1/img2img",
            {**SMALL, "init_images": [png_base64(600, 600)], "outpaint_left": 2048},
            "outpaint_left: the outpainted canvas would be 2648x600",
        ),
        (
            "/sdapi/v1/extra-single-image",
            {"image": png_base64(600, 600), "upscaling_resize": 2, "upscaler_1": "Lanczos"},
            "upscaling_resize: the upscaled image would be 1200x1200",
        ),
    ]
    for path, body, words in limited:
        response = client.post(path, json=body)
        assert response.status_code == 422, (path, response.text)
        assert words in response.json()["errors"] and "1.0 megapixels" in response.json()["errors"]


def test_wrongly_typed_override_settings_are_422_naming_the_key(client: TestClient) -> None:
    init = png_base64(64, 64)
    for value in ([], {}, True, "two", 2.5, 99):
        for path, body in [
            ("/sdapi/v1/txt2img", dict(SMALL)),
            ("/sdapi/v1/img2img", {**SMALL, "init_images": [init]}),
            ("/studio/v1/jobs", {"mode": "txt2img", **SMALL}),
        ]:
            body["override_settings"] = {"CLIP_stop_at_last_layers": value}
            response = client.post(path, json=body)
            assert response.status_code == 422, (path, value, response.text)
            assert "override_settings.CLIP_stop_at_last_layers: " in response.json()["errors"], response.text
    for key in ("sd_model_checkpoint", "sd_vae", "face_restoration_model", "eta_noise_seed_delta"):
        response = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {key: [{}]}})
        assert response.status_code == 422 and f"override_settings.{key}: " in response.json()["errors"]


def write_output(outputs: Path, name: str) -> Path:
    path = outputs / "txt2img-images" / "2024-01-01" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def record_job(services: Any, owner: str, path: Path, *, finished: bool = True) -> None:
    store = services.queue.store
    job_id = store.add(owner, "txt2img", {"mode": "txt2img"})
    store.record_output(job_id, str(path))
    if finished:
        store.finish(job_id, "done", result={"images": [str(path)], "info": {}})


@pytest.mark.parametrize("share_outputs", [False, True])
def test_output_files_are_served_to_their_owner_only(tmp_path: Path, share_outputs: bool) -> None:
    client, services = build_client(tmp_path, share_outputs=share_outputs)
    outputs = tmp_path / "outputs"
    alices = write_output(outputs, "00001-1234.png")
    running = write_output(outputs, "00002-99.png")
    stray = write_output(outputs, "00003-7.png")  # no job wrote it
    record_job(services, "user:alice", alices)
    record_job(services, "user:alice", running, finished=False)
    url = "/studio/v1/files/txt2img-images/2024-01-01/"
    with client:
        for name in (alices.name, running.name):
            assert client.get(url + name, auth=("alice", API_USERS["alice"])).status_code == 200
            expected = 200 if share_outputs else 404
            assert client.get(url + name, auth=("bob", API_USERS["bob"])).status_code == expected
        assert client.get(url + stray.name, auth=("alice", API_USERS["alice"])).status_code == (
            200 if share_outputs else 404
        )
        assert client.get(url + "00004-1.png", auth=("alice", API_USERS["alice"])).status_code == 404


def test_without_auth_everyone_gets_every_output(tmp_path: Path) -> None:
    client, services = build_client(tmp_path, auth=False)
    path = write_output(tmp_path / "outputs", "00001-1234.png")
    record_job(services, "client:10.0.0.2", path)
    with client:
        assert client.get("/studio/v1/files/txt2img-images/2024-01-01/00001-1234.png").status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
OVERRIDE_KEYS = [
    "sd_model_checkpoint",
    "sd_vae",
    "face_restoration_model",
    "CLIP_stop_at_last_layers",
    "eta_noise_seed_delta",
    "anything_else",
]
UNIT_KEYS = [
    "enabled",
    "module",
    "model",
    "weight",
    "image",
    "processor_res",
    "threshold_a",
    "guidance_end",
    "control_mode",
    "resize_mode",
    "pixel_perfect",
    "hr_option",
]


def test_override_settings_and_alwayson_scripts_fuzz_gets_no_server_error(client: TestClient) -> None:
    """Every JSON type in every ``override_settings`` key and ControlNet unit field: a 4xx or a request
    the models accept (queueing it is refused by ``no_jobs`` and shows up as a 500 here), never a 500."""
    from app.api.schemas import Txt2ImgApiRequest

    seen: list[int] = []

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        key=st.sampled_from(OVERRIDE_KEYS),
        value=JSON_VALUES,
        unit_key=st.sampled_from(UNIT_KEYS),
        unit_value=JSON_VALUES,
        scripts_shape=st.sampled_from(["args", "bare", "value"]),
    )
    def exercise(key: str, value: Any, unit_key: str, unit_value: Any, scripts_shape: str) -> None:
        unit = {"enabled": True, unit_key: unit_value}
        scripts: Any = (
            {"args": [unit]}
            if scripts_shape == "args"
            else ([unit] if scripts_shape == "bare" else unit_value)
        )
        body = {**SMALL, "override_settings": {key: value}, "alwayson_scripts": {"controlnet": scripts}}
        try:
            Txt2ImgApiRequest.model_validate(body)
            accepted = True
        except ValueError:  # pydantic's ValidationError is a ValueError; anything else is a bug here
            accepted = False
        if accepted:
            return  # a valid job would run; the refusal paths are what is fuzzed
        response = client.post("/sdapi/v1/txt2img", json=body)
        seen.append(response.status_code)
        assert response.status_code in (400, 404, 422), (body, response.status_code, response.text[:300])

    exercise()
    assert len(seen) >= 20, seen
