"""``python launch.py talk`` from a shell, with random-weight official-layout checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.sadtalker.helpers import probe, write_wav

ROOT = Path(__file__).resolve().parents[2]


def talk(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDSTUDIO_SKIP_VENV": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "talk", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_talk_makes_an_mp4_with_audio(
    sadtalker_models_root: Path, astronaut_png: Path, speech_wav: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The CLI command in-process (the face generator swapped for the cheap stand-in: the real one
    takes ~30 s per frame on CPU; tests/sadtalker/test_engine_checkpoint_render.py runs it)."""
    from app.cli import main
    from app.settings import StudioSettings
    from sadtalker.engine import TalkingHeadEngine
    from tests.sadtalker.helpers import CheapGenerator

    real_models = TalkingHeadEngine.models

    def cheap_models(self: TalkingHeadEngine, size: int) -> object:
        models = real_models(self, size)
        models.generator = CheapGenerator()
        return models

    monkeypatch.setattr(TalkingHeadEngine, "models", cheap_models)
    out = tmp_path / "out"
    settings = StudioSettings(models_dir=sadtalker_models_root, data_dir=tmp_path / "data", outputs_dir=out)
    code = main(
        [
            "talk",
            "--image",
            str(astronaut_png),
            "--audio",
            str(speech_wav),
            "--seed",
            "3",
            "--batch-size",
            "8",
            "--preprocess",
            "full",
        ],
        settings,
    )
    printed = capsys.readouterr().out
    assert code == 0
    video = Path(printed.strip().splitlines()[-1])
    assert video.parent == out / "talking-head" and video.suffix == ".mp4"
    info = probe(video)
    assert info["video_codec"] == "h264"
    assert info["audio_codecs"] == ["aac"]
    assert video.with_suffix(".json").is_file()


def test_talk_reports_bad_input_clearly(
    sadtalker_models_root: Path, astronaut_png: Path, tmp_path: Path
) -> None:
    audio = write_wav(tmp_path / "a.wav", np.zeros(16000))
    bad_style = talk("--image", str(astronaut_png), "--audio", str(audio), "--pose-style", "46")
    assert bad_style.returncode == 2
    assert "pose_style" in bad_style.stderr
    empty = tmp_path / "models"
    empty.mkdir()
    missing = talk(
        "--image",
        str(astronaut_png),
        "--audio",
        str(audio),
        "--models-dir",
        str(empty),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert missing.returncode == 1
    assert "SadTalker_V0.0.2_256.safetensors" in missing.stderr
    assert "Traceback" not in missing.stderr
