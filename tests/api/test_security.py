"""LAN security: auth on every route, file serving confined to the outputs folder, no pickle code,
upload limits, and errors that name fields instead of showing tracebacks."""

from __future__ import annotations

import base64
import http.client
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.api.conftest import API_USERS, ROOT, UI_USER, StudioServer, record_finished_output


def every_api_route(server: StudioServer, session: requests.Session) -> list[tuple[str, str]]:
    schema = session.get(server.url + "/openapi.json").json()
    routes = []
    for path, operations in schema["paths"].items():
        concrete = path.replace("{job_id}", "0" * 32).replace("{path}", "txt2img-images/x.png")
        routes += [(method.upper(), concrete) for method in operations]
    return routes


def test_every_route_needs_credentials(studio_server: StudioServer, alice: requests.Session) -> None:
    routes = every_api_route(studio_server, alice)
    assert len(routes) >= 40  # the whole API, not a handful
    routes += [
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("GET", f"/gradio_api/file={studio_server.work / 'outputs'}/x.png"),
    ]
    anonymous = requests.Session()
    wrong = requests.Session()
    wrong.auth = ("alice", "not-her-password")
    ui_user_on_api = requests.Session()
    ui_user_on_api.auth = UI_USER
    for method, path in routes:
        response = anonymous.request(method, studio_server.url + path, json={})
        assert response.status_code == 401, (method, path, response.status_code)
        if path.startswith(("/sdapi", "/studio", "/controlnet")):
            assert response.headers["WWW-Authenticate"].startswith("Basic")
            for session in (wrong, ui_user_on_api):
                assert session.request(method, studio_server.url + path, json={}).status_code == 401


def raw_get(server: StudioServer, path: str) -> int:
    """GET ``path`` exactly as written (requests would normalise ``..`` away)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    token = base64.b64encode(f"alice:{API_USERS['alice']}".encode()).decode()
    connection.request("GET", path, headers={"Authorization": f"Basic {token}"})
    status = connection.getresponse().status
    connection.close()
    return status


def test_file_serving_stays_inside_the_outputs_folder(
    studio_server: StudioServer, alice: requests.Session
) -> None:
    outputs = studio_server.work / "outputs"
    secret = studio_server.work / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    (outputs / "escape").mkdir(parents=True, exist_ok=True)
    (outputs / "escape" / "link.png").symlink_to(secret)
    Image.new("RGB", (4, 4)).save(outputs / "ok.png")
    (outputs / ".hidden.png").write_bytes((outputs / "ok.png").read_bytes())
    (outputs / "notes.txt").write_text("not an image")
    assert raw_get(studio_server, "/studio/v1/files/ok.png") == 404  # no job of alice's wrote it
    record_finished_output(studio_server.work / "data", "user:alice", outputs / "ok.png")
    assert raw_get(studio_server, "/studio/v1/files/ok.png") == 200
    for path in [
        "/studio/v1/files/../secret.png",
        "/studio/v1/files/..%2fsecret.png",
        "/studio/v1/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/studio/v1/files//etc/passwd",
        f"/studio/v1/files/{secret}",
        "/studio/v1/files/escape/link.png",
        "/studio/v1/files/.hidden.png",
        "/studio/v1/files/notes.txt",
        "/studio/v1/files/",
    ]:
        assert raw_get(studio_server, path) in (403, 404), path
    login = requests.Session()
    assert login.post(
        studio_server.url + "/login", data=dict(zip(("username", "password"), UI_USER, strict=True))
    )
    for path in ["/etc/passwd", str(secret), f"{outputs}/../secret.png"]:
        assert login.get(f"{studio_server.url}/gradio_api/file={path}").status_code in (403, 404), path


def test_pickled_checkpoint_with_code_is_refused_without_running_it(
    studio_server: StudioServer, alice: requests.Session, api_models_root: Path, pickle_marker: Path
) -> None:
    from pipelines.errors import CheckpointLoadError
    from pipelines.models.weight_files import read_pickled_state_dict

    evil = api_models_root / "Stable-diffusion" / "evil.ckpt"
    with pytest.raises(CheckpointLoadError, match="refused to load"):
        read_pickled_state_dict(evil)
    assert not pickle_marker.exists()
    switch = alice.post(studio_server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "evil.ckpt"})
    assert switch.status_code == 400 and "refused to load" in switch.json()["detail"]
    job = alice.post(
        studio_server.url + "/sdapi/v1/txt2img",
        json={"width": 64, "height": 64, "steps": 1, "override_settings": {"sd_model_checkpoint": "evil"}},
    )
    assert job.status_code == 400 and "refused to load" in job.json()["detail"]
    assert not pickle_marker.exists()


def test_uploads_over_the_limit_are_refused(studio_server: StudioServer, alice: requests.Session) -> None:
    big = {"image": "A" * (1024 * 1024 + 10)}  # the server runs with --max-upload-mb 1
    response = alice.post(studio_server.url + "/sdapi/v1/png-info", json=big)
    assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]

    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"image": "'
        for _ in range(20):
            yield b"A" * 65536
        yield b'"}'

    chunked = alice.post(
        studio_server.url + "/sdapi/v1/png-info", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413


def test_bad_requests_name_the_field_and_never_show_a_traceback(
    studio_server: StudioServer, alice: requests.Session
) -> None:
    url = studio_server.url + "/sdapi/v1"
    bad_unit = {"ControlNet": {"args": [{"enabled": True, "weight": 7}]}}
    cases = [
        ("/txt2img", {"steps": 0, "width": 100}, 422, ["steps", "width: must be a multiple of 8"]),
        ("/txt2img", {"sampler_name": "Euler Z"}, 400, ["Sampler not found", "Euler Z"]),
        ("/txt2img", {"scheduler": "sideways"}, 422, ["scheduler"]),
        ("/img2img", {"init_images": ["not base64!"]}, 422, ["init_images.0"]),
        ("/img2img", {"init_images": ["/etc/passwd"]}, 422, ["init_images.0"]),
        ("/img2img", {"init_images": []}, 422, ["init_images"]),
        ("/png-info", {"image": base64.b64encode(b"not an image").decode()}, 422, ["image"]),
        ("/extra-single-image", {"image": "", "upscaling_resize": 99}, 422, ["upscaling_resize"]),
        ("/txt2img", {"alwayson_scripts": bad_unit}, 422, ["controlnet_units.0.weight"]),
        ("/txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True, {}]}}}, 422, ["ADetailer not found"]),
        ("/txt2img", {"script_name": "x/y/z plot"}, 422, ["Script 'x/y/z plot' not found"]),
        ("/options", {"CLIP_stop_at_last_layers": 99}, 422, ["CLIP_stop_at_last_layers"]),
    ]
    for path, body, status, words in cases:
        response = alice.post(url + path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert "Traceback" not in response.text
        message = response.json()["errors"]
        for word in words:
            assert word in message, (path, message)
    not_json = alice.post(url + "/txt2img", data=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and "Traceback" not in not_json.text


def test_the_api_never_imports_gradio() -> None:
    code = (
        "import sys\n"
        "from app.api import build_api_app\n"
        "from app.services import StudioServices\n"
        "from app.settings import StudioSettings\n"
        "import tempfile, pathlib\n"
        "work = pathlib.Path(tempfile.mkdtemp())\n"
        "settings = StudioSettings(data_dir=work, outputs_dir=work, models_dir=work)\n"
        "build_api_app(StudioServices.create(settings))\n"
        "import app.server\n"
        "assert 'gradio' not in sys.modules, 'gradio was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
