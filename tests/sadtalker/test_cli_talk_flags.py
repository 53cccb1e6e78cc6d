"""``launch.py talk`` flags come from ``TalkingHeadRequest``'s fields (issue #10 item 5, issue #14 item 8).

A field added to the request is a flag with its description, range and default and no CLI code;
the reference's remaining options (head-angle paths, background enhancer, the wider expression
scale) are driven from a shell here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from app.cli import build_parser, talking_head_request_from_args
from contract.talking_head import TalkingHeadRequest
from tests.sadtalker.helpers import write_wav

ROOT = Path(__file__).resolve().parents[2]


def talk(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDSTUDIO_SKIP_VENV": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "talk", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def parse(*args: str) -> TalkingHeadRequest:
    return talking_head_request_from_args(build_parser().parse_args(["talk", *args]))


@pytest.fixture(scope="module")
def upscaler_models_root(sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SadTalker files plus a tiny random-weight ESRGAN in ``ESRGAN/``."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    root = tmp_path_factory.mktemp("cli_models")
    (root / "SadTalker").symlink_to(sadtalker_models_root / "SadTalker", target_is_directory=True)
    (root / "ESRGAN").mkdir()
    torch.manual_seed(4)
    save_file(
        ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict(),
        str(root / "ESRGAN" / "2x-tiny.safetensors"),
    )
    return root


def test_every_request_field_is_a_flag() -> None:
    talk_parser = build_parser()._subparsers._group_actions[0].choices["talk"]
    flags = {option for action in talk_parser._actions for option in action.option_strings}
    for name in TalkingHeadRequest.model_fields:
        if name != "mode":
            assert "--" + name.replace("_", "-") in flags, name


def test_flags_become_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # the portraits must exist: images are decoded when a request is built
    for name in ("face.png", "a.png"):
        Image.new("RGB", (8, 8)).save(name)
    request = parse(
        *("--image", "face.png", "--audio", "speech.wav"),
        *("--input-yaw", "0", "15", "-10", "--input-pitch", "-5", "--input-roll", "2.5", "0"),
        *("--background-enhancer", "2x-tiny", "--expression-scale", "7.5", "--size", "512"),
        *("--preprocess", "full", "--still", "--enhancer", "gfpgan", "--ref-pose", "pose.mp4"),
    )
    assert request.image == Path("face.png") and request.audio == Path("speech.wav")
    assert request.input_yaw == [0.0, 15.0, -10.0]
    assert request.input_pitch == [-5.0] and request.input_roll == [2.5, 0.0]
    assert request.background_enhancer == "2x-tiny" and request.expression_scale == 7.5
    assert request.size == 512 and request.preprocess == "full" and request.still is True
    assert request.enhancer == "gfpgan" and request.ref_pose == Path("pose.mp4")
    # Absent flags keep the model's defaults.
    defaults = parse("--image", "a.png", "--audio", "a.wav")
    assert defaults == TalkingHeadRequest(image=Path("a.png"), audio=Path("a.wav"))


def test_help_lists_the_new_flags_with_their_descriptions() -> None:
    shown = talk("--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # argparse wraps lines
    for flag in ("--input-yaw", "--input-pitch", "--input-roll", "--background-enhancer"):
        assert flag in text
    assert "Head yaw path in degrees" in text
    assert "Upscaler from models/ESRGAN" in text
    assert "(0.0 to 10.0, default 1.0)" in text  # the expression scale's range, from the model
    assert "--size {256,512}" in text and "--still, --no-still" in text


def test_bad_values_are_refused_by_field_name_from_a_shell(
    upscaler_models_root: Path, astronaut_png: Path, tmp_path: Path
) -> None:
    audio = write_wav(tmp_path / "a.wav", 0.3 * np.sin(np.arange(4000) / 10))
    common = ("--image", str(astronaut_png), "--audio", str(audio))
    too_expressive = talk(*common, "--expression-scale", "10.5")
    assert too_expressive.returncode == 2
    assert "expression_scale" in too_expressive.stderr and "10" in too_expressive.stderr
    not_an_upscaler = talk(
        *common,
        *("--background-enhancer", "4x-UltraSharp", "--models-dir", str(upscaler_models_root)),
        *("--data-dir", str(tmp_path / "data"), "--outputs-dir", str(tmp_path / "out")),
    )
    assert not_an_upscaler.returncode == 1
    assert "background_enhancer: there is no upscaler named '4x-UltraSharp'" in not_an_upscaler.stderr
    assert "2x-tiny" in not_an_upscaler.stderr  # what is installed
    assert "Traceback" not in not_an_upscaler.stderr


def test_talk_with_angles_background_enhancer_and_a_strong_expression(
    upscaler_models_root: Path, astronaut_png: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """End to end in-process (the face generator swapped for the cheap stand-in, as in test_cli_talk)."""
    from app.cli import main
    from app.settings import StudioSettings
    from sadtalker.engine import TalkingHeadEngine
    from tests.sadtalker.helpers import CheapGenerator, probe

    real_models = TalkingHeadEngine.models

    def cheap_models(self: TalkingHeadEngine, size: int) -> object:
        models = real_models(self, size)
        models.generator = CheapGenerator()
        return models

    monkeypatch.setattr(TalkingHeadEngine, "models", cheap_models)
    audio = write_wav(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 150 * np.arange(4800) / 16000))
    out = tmp_path / "out"
    settings = StudioSettings(models_dir=upscaler_models_root, data_dir=tmp_path / "data", outputs_dir=out)
    code = main(
        [
            *("talk", "--image", str(astronaut_png), "--audio", str(audio), "--seed", "9"),
            *("--input-yaw", "-20", "20", "--input-roll", "5", "--background-enhancer", "2x-tiny"),
            *("--expression-scale", "6", "--batch-size", "4"),
        ],
        settings,
    )
    assert code == 0
    video = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe(video)["video_codec"] == "h264"
    parameters = json.loads(video.with_suffix(".json").read_text())["parameters"]
    assert parameters["input_yaw"] == [-20.0, 20.0] and parameters["input_roll"] == [5.0]
    assert parameters["input_pitch"] is None
    assert parameters["background_enhancer"] == "2x-tiny" and parameters["expression_scale"] == 6.0
