"""The real ``webuiapi`` client (what chat bots and scripts use against A1111) against our server."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from tests.api.conftest import API_USERS, StudioServer

STEPS = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def api(studio_server: StudioServer) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(
        host="127.0.0.1",
        port=studio_server.port,
        username="alice",
        password=API_USERS["alice"],
        sampler="Euler a",
        steps=2,
    )


def pattern(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 90, 200))
    draw = ImageDraw.Draw(image)
    for x in range(0, size, 8):
        draw.line([(x, 0), (x, size)], fill=(250, 220, 30), width=2)
    return image


@pytest.fixture(scope="module")
def lighthouse(api: webuiapi.WebUIApi) -> webuiapi.WebUIApiResult:
    return api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=11, cfg_scale=6.5, **STEPS)


def test_txt2img_returns_pngs_with_parameters_and_json_info(lighthouse: webuiapi.WebUIApiResult) -> None:
    assert len(lighthouse.images) == 1
    image = lighthouse.image
    assert image.size == (64, 64)
    parameters = image.info["parameters"]
    assert parameters.startswith("a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler a")
    assert "Seed: 11" in parameters and "CFG scale: 6.5" in parameters
    info = lighthouse.info
    assert isinstance(info, dict), "info must be a JSON string, as A1111 returns it"
    assert info["all_seeds"] == [11] and info["prompt"] == "a lighthouse"
    assert info["infotexts"] == [parameters]
    assert len(info["job_id"]) == 32
    assert lighthouse.parameters["prompt"] == "a lighthouse"
    assert lighthouse.parameters["sampler_name"] == "Euler a"


def test_png_info_reads_the_parameters_back(
    api: webuiapi.WebUIApi, lighthouse: webuiapi.WebUIApiResult
) -> None:
    result = api.png_info(lighthouse.image)
    assert result.info == lighthouse.image.info["parameters"]
    assert result.parameters["Prompt"] == "a lighthouse"
    assert result.parameters["Negative prompt"] == "fog"
    assert result.parameters["Steps"] == "2"
    assert (result.parameters["Size-1"], result.parameters["Size-2"]) == ("64", "64")


def test_img2img_with_a_mask_changes_only_the_masked_area(api: webuiapi.WebUIApi) -> None:
    source = pattern()
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 47, 47], fill=255)
    result = api.img2img(
        images=[source],
        mask_image=mask,
        mask_blur=2,
        inpainting_fill=1,
        inpaint_full_res=False,
        denoising_strength=0.9,
        prompt="a red door",
        seed=5,
        override_settings={"sd_model_checkpoint": "tiny-sd1-inpaint"},
        **STEPS,
    )
    output = result.image.convert("RGB")
    assert output.size == (64, 64)
    for corner in [(1, 1), (62, 1), (1, 62), (62, 62)]:
        assert output.getpixel(corner) == source.getpixel(corner)
    assert output.crop((24, 24, 40, 40)).tobytes() != source.crop((24, 24, 40, 40)).tobytes()
    parameters = output.info.get("parameters") or result.image.info["parameters"]
    assert "Denoising strength: 0.9" in parameters and "Mask blur: 2" in parameters
    assert "Model: tiny-sd1-inpaint" in parameters
    assert result.parameters["init_images"] is None  # not echoed back unless include_init_images


def test_extra_single_image_and_batch_upscale(api: webuiapi.WebUIApi) -> None:
    single = api.extra_single_image(image=pattern(), upscaler_1="Lanczos", upscaling_resize=2)
    assert single.image.size == (128, 128)
    assert isinstance(single.info, str)  # html_info
    batch = api.extra_batch_images(
        images=[pattern(), pattern(32)], upscaler_1="Nearest", upscaling_resize=1.5
    )
    assert [image.size for image in batch.images] == [(96, 96), (48, 48)]


def test_sd_models_and_switching_the_model(
    api: webuiapi.WebUIApi, alice: requests.Session, studio_server: StudioServer
) -> None:
    models = {model["model_name"]: model for model in api.get_sd_models()}
    assert {"tiny-sd1", "tiny-sd1-inpaint", "evil"} <= set(models)
    assert models["tiny-sd1"]["filename"].endswith("tiny-sd1.safetensors")
    api.util_set_model("tiny-sd1")
    current = api.util_get_current_model()
    assert current.startswith("tiny-sd1.safetensors [") and current.endswith("]")
    refused = alice.post(
        studio_server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"}
    )
    assert refused.status_code == 400
    assert "no-such-model" in refused.json()["detail"]
    assert api.get_options()["sd_model_checkpoint"] == current


def test_catalogues_have_a1111_shapes(api: webuiapi.WebUIApi) -> None:
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    assert {"None", "Lanczos", "Nearest"} <= {u["name"] for u in api.get_upscalers()}
    assert api.get_loras() == [] and api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert isinstance(api.get_face_restorers(), list) and isinstance(api.get_prompt_styles(), list)
    assert "ram" in api.get_memory() and "cuda" in api.get_memory()
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["api_auth"] == "***" and flags["auth"] == "***"
    assert api.refresh_checkpoints() is None


@pytest.fixture()
def slow_job(api: webuiapi.WebUIApi) -> Iterator[tuple[threading.Thread, dict[str, Any]]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["result"] = api.txt2img(prompt="a long job", seed=3, steps=100, width=64, height=64)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield worker, outcome
    worker.join(120)


def test_progress_shows_the_running_job_and_interrupt_stops_it(
    api: webuiapi.WebUIApi, slow_job: tuple[threading.Thread, dict[str, Any]]
) -> None:
    worker, outcome = slow_job
    progress: dict[str, Any] = {}
    for _ in range(600):
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 1:
            break
        worker.join(0.2)  # waits at most 0.2 s, and ends early if the job already finished
    assert progress["state"]["sampling_steps"] == 100, progress
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] >= 0
    assert progress["state"]["job_count"] >= 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.width == preview.height >= 32  # the worker's live preview of the square job
    assert api.interrupt() == {}
    worker.join(120)
    result = outcome["result"]
    # A1111 answers with the partly denoised picture of the interrupted job, marked as such
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["interrupted"] is True
    assert "Interrupted: at step" in result.info["infotexts"][0]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_controlnet_through_the_extension_unit(api: webuiapi.WebUIApi) -> None:
    models = api.controlnet_model_list()
    assert len(models) == 1 and models[0].startswith("tiny-cn [")
    assert {"none", "canny", "invert"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 2
    unit = webuiapi.ControlNetUnit(image=pattern(), module="invert", model=models[0], weight=1.0)
    result = api.txt2img(prompt="a house", seed=9, controlnet_units=[unit], **STEPS)
    assert result.image.size == (64, 64)
    assert "ControlNet 0" in result.image.info["parameters"]


def test_controlnet_detect_returns_the_preprocessor_maps(api: webuiapi.WebUIApi) -> None:
    result = api.controlnet_detect([pattern(), pattern(32)], module="canny", processor_res=64)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    edges = np.asarray(result.images[0].convert("L"))
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255


def test_controlnet_detect_errors_name_the_problem(studio_server: StudioServer) -> None:
    auth = ("alice", API_USERS["alice"])
    url = f"{studio_server.url}/controlnet/detect"
    image = "data:image/png;base64," + base64.b64encode(_png(pattern())).decode()
    missing = requests.post(
        url, json={"controlnet_module": "softedge_hed", "controlnet_input_images": [image]}, auth=auth
    )
    assert missing.status_code == 404 and "ControlNetHED.pth" in missing.json()["detail"]
    unknown = requests.post(url, json={"controlnet_module": "x-ray"}, auth=auth)
    assert unknown.status_code == 400 and "x-ray" in unknown.json()["detail"]
    bad = requests.post(url, json={"controlnet_module": "canny", "controlnet_images": ["abc"]}, auth=auth)
    assert bad.status_code == 422 and "controlnet_input_images.0" in bad.json()["detail"]
    assert requests.post(url, json={}).status_code == 401


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_memory_report_never_creates_a_cuda_context_in_the_head(monkeypatch) -> None:
    """GET /sdapi/v1/memory in a head whose jobs run in worker processes: asking CUDA would create
    a context (hundreds of MB on GPU 0) in a process that runs no jobs."""
    import torch

    from app.api.a1111_routes import cuda_usage

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def must_not_be_called() -> None:
        raise AssertionError("mem_get_info creates a CUDA context")

    monkeypatch.setattr(torch.cuda, "mem_get_info", must_not_be_called)
    assert "worker processes" in cuda_usage()["error"]
