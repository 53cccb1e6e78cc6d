"""The Talking head tab's new inputs without a browser: head-angle paths, the background enhancer and
the expression scale's range (the slider reads it from the request model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from app.ui.talking_head_tab import background_enhancer_choices, build, parse_angle_path, request_from_form
from contract.talking_head import TalkingHeadRequest


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spandrel.architectures.ESRGAN import ESRGAN

    root = tmp_path_factory.mktemp("tab_models")
    (root / "ESRGAN").mkdir()
    torch.manual_seed(0)
    save_file(
        ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict(),
        str(root / "ESRGAN" / "2x-tiny.safetensors"),
    )
    return root


def _uploaded_portrait() -> str:
    """A real picture where Gradio would have stored the upload (requests check their images)."""
    import tempfile

    from PIL import Image

    path = Path(tempfile.mkdtemp(prefix="gradio-upload-")) / "face.png"
    Image.new("RGB", (64, 64), "gray").save(path)
    return str(path)


UPLOADED_PORTRAIT = _uploaded_portrait()


def form_values(**changes: Any) -> dict[str, Any]:
    """What the components hand to the click handler, by field name (sliders give floats)."""
    values: dict[str, Any] = {
        "image": UPLOADED_PORTRAIT,
        "audio": "/tmp/gradio/speech.wav",
        "pose_style": 3.0,
        "expression_scale": 1.0,
        "size": 256,
        "preprocess": "crop",
        "enhancer": "none",
        "background_enhancer": "none",
        "still": False,
        "batch_size": 2.0,
        "seed": -1,
        "ref_eyeblink": None,
        "ref_pose": None,
        "input_yaw": "",
        "input_pitch": "",
        "input_roll": "",
    }
    return values | changes


def test_the_form_becomes_a_request_with_the_new_fields() -> None:
    request = request_from_form(
        form_values(
            input_yaw="0, 15, -10",
            input_pitch="-5",
            input_roll=" 2.5;0 ",
            background_enhancer="2x-tiny",
            enhancer="gfpgan",
            expression_scale=8.5,
        )
    )
    assert request.input_yaw == [0.0, 15.0, -10.0]
    assert request.input_pitch == [-5.0] and request.input_roll == [2.5, 0.0]
    assert request.background_enhancer == "2x-tiny" and request.enhancer == "gfpgan"
    assert request.expression_scale == 8.5 and request.pose_style == 3
    plain = request_from_form(form_values())
    assert plain.input_yaw is plain.input_pitch is plain.input_roll is None
    assert plain.background_enhancer is None and plain.enhancer is None


def test_a_bad_angle_is_named_by_its_field() -> None:
    assert parse_angle_path("  ", "input_yaw") is None
    assert parse_angle_path("1 2\t3", "input_yaw") == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"input_pitch: 'left' is not an angle"):
        request_from_form(form_values(input_pitch="10, left"))


def test_background_choices_are_the_model_upscalers(models_root: Path, tmp_path: Path) -> None:
    assert background_enhancer_choices(models_root) == ["none", "2x-tiny"]
    assert background_enhancer_choices(tmp_path) == ["none"]  # no built-in resizes offered


def test_the_tab_builds_with_the_new_inputs(models_root: Path) -> None:
    import gradio as gr

    services = SimpleNamespace(settings=SimpleNamespace(models_dir=models_root))
    with gr.Blocks() as page:
        build(services)  # type: ignore[arg-type]
    by_id = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)}
    expression = by_id["talking_head_expression_scale"]
    bound = TalkingHeadRequest.model_fields["expression_scale"].metadata
    assert expression.maximum == 10.0 == next(item.le for item in bound if hasattr(item, "le"))
    assert expression.minimum == 0.0
    background = by_id["talking_head_background_enhancer"]
    assert [choice[0] for choice in background.choices] == ["none", "2x-tiny"] and background.value == "none"
    for name in ("input_yaw", "input_pitch", "input_roll"):
        assert isinstance(by_id[f"talking_head_{name}"], gr.Textbox)
