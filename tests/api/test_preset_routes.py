"""``/studio/v1/presets``: save, list, run with a photo (answered like ``POST /studio/v1/jobs``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from contract.images import Img2ImgRequest

REQUEST = {
    "prompt": "poster of {prompt}",
    "negative_prompt": "text",
    "sampler_name": "Euler",
    "steps": 2,
    "denoising_strength": 0.6,
    "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
}


@pytest.fixture()
def client(studio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    from app.api import build_api_app

    monkeypatch.setattr(studio.settings, "presets_dir", tmp_path / "presets")
    monkeypatch.delenv("DISCORD_PUBLIC_KEY", raising=False)
    studio.start_queue()
    return TestClient(build_api_app(studio))


def photo_base64() -> str:
    image = Image.new("RGB", (120, 80), (20, 120, 60))
    image.paste((250, 250, 0), (10, 10, 50, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True)
    return base64.b64encode(buffer.getvalue()).decode()


def test_save_list_and_run_a_preset(studio, client: TestClient) -> None:
    body = {
        "name": "poster",
        "mode": "img2img",
        "request": REQUEST,
        "longest_side": 96,
        "description": "A poster",
    }
    saved = client.post("/studio/v1/presets", json=body)
    assert saved.status_code == 201, saved.text
    assert saved.json()["ready"] is True
    assert client.post("/studio/v1/presets", json=body).status_code == 409
    assert client.post("/studio/v1/presets", json={**body, "replace": True}).status_code == 201

    listed = client.get("/studio/v1/presets").json()["presets"]
    assert [item["name"] for item in listed] == ["poster"]
    assert listed[0]["needs_photo"] is True and listed[0]["description"] == "A poster"

    photo = photo_base64()
    answer = client.post(
        "/studio/v1/presets/poster/jobs", json={"prompt": "a lighthouse", "image": photo, "seed": 9}
    )
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert set(accepted) == {"id", "state", "position", "links"}
    assert accepted["links"]["self"] == f"/studio/v1/jobs/{accepted['id']}"
    status = studio.queue.wait(accepted["id"], timeout=300)
    assert status.state == "done", status.error
    view = client.get(f"/studio/v1/jobs/{accepted['id']}").json()
    image_bytes = client.get(view["links"]["images"][0]).content
    ran = np.array(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    assert ran.shape == (64, 96, 3)  # 120x80 fitted to a longest side of 96

    # the same job sent in full
    resized = (
        Image.open(io.BytesIO(base64.b64decode(photo)))
        .convert("RGB")
        .resize((96, 64), Image.Resampling.LANCZOS)
    )
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    full = Img2ImgRequest(
        **{**REQUEST, "prompt": "poster of a lighthouse"},
        init_images=[base64.b64encode(buffer.getvalue()).decode()],
        width=96,
        height=64,
        seed=9,
    )
    assert np.array_equal(ran, np.array(studio.engine.run(full).images[0].image.convert("RGB")))


def test_preset_errors_are_clear(studio, client: TestClient, tmp_path: Path) -> None:
    missing = client.post("/studio/v1/presets/nothing/jobs", json={"prompt": "x"})
    assert missing.status_code == 404 and "No preset named 'nothing'" in missing.json()["detail"]

    no_slot = client.post(
        "/studio/v1/presets", json={"name": "flat", "mode": "txt2img", "request": {"prompt": "a cat"}}
    )
    assert no_slot.status_code == 400 and "{prompt}" in no_slot.json()["detail"]

    folder = tmp_path / "presets"
    folder.mkdir(exist_ok=True)
    (folder / "gone.yaml").write_text(
        "name: gone\nmode: txt2img\nrequest:\n  prompt: '{prompt}'\n  override_settings:\n"
        "    sd_model_checkpoint: removed-model\n",
        encoding="utf-8",
    )
    gone = client.post("/studio/v1/presets/gone/jobs", json={"prompt": "a cat"})
    assert gone.status_code == 404
    assert "gone.yaml" in gone.json()["detail"] and "removed-model" in gone.json()["detail"]
    listed = {item["name"]: item for item in client.get("/studio/v1/presets").json()["presets"]}
    assert listed["gone"]["ready"] is False and "removed-model" in listed["gone"]["error"]

    photo_needed = client.post(
        "/studio/v1/presets", json={"name": "poster", "mode": "img2img", "request": REQUEST}
    )
    assert photo_needed.status_code == 201
    no_photo = client.post("/studio/v1/presets/poster/jobs", json={"prompt": "x"})
    assert no_photo.status_code == 400 and "needs a photo" in no_photo.json()["detail"]
    not_base64 = client.post("/studio/v1/presets/poster/jobs", json={"prompt": "x", "image": "%%%"})
    assert not_base64.status_code == 422


def test_discord_route_without_a_key_says_it_is_not_configured(client: TestClient) -> None:
    answer = client.post("/discord/interactions", json={"type": 1})
    assert answer.status_code == 503 and "DISCORD_PUBLIC_KEY" in answer.json()["detail"]
