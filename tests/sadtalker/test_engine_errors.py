"""Bad inputs give clear errors and leave nothing behind; a silent recording is a valid input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from contract.talking_head import TalkingHeadRequest
from sadtalker.engine import TalkingHeadEngine
from sadtalker.errors import (
    AudioFileError,
    EmptyAudioError,
    ImageFileError,
    NoFaceError,
    SadTalkerError,
)
from tests.sadtalker.helpers import CheapGenerator, files_in, probe, write_wav


@pytest.fixture(scope="module")
def engine(sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TalkingHeadEngine:
    engine = TalkingHeadEngine(sadtalker_models_root, tmp_path_factory.mktemp("outputs"), device="cpu")
    engine.models(256).generator = CheapGenerator()
    return engine


@pytest.fixture(scope="module")
def silence(media_dir: Path) -> Path:
    return write_wav(media_dir / "silence.wav", np.zeros(int(16000 * 0.6)))


def outputs_of(engine: TalkingHeadEngine) -> list[str]:
    return files_in(engine.outputs_root)


def test_silent_recording_gives_a_valid_still_video(
    engine: TalkingHeadEngine, astronaut_png: Path, silence: Path
) -> None:
    result = engine.run(TalkingHeadRequest(image=astronaut_png, audio=silence, seed=0))
    info = probe(result.path)
    assert info["video_codec"] == "h264" and info["audio_codecs"] == ["aac"]
    assert result.frames == 15 and abs(info["duration"] - 0.6) <= 1 / 25
    for leftover in (result.path, result.sidecar):
        leftover.unlink()


def test_photo_without_a_face(engine: TalkingHeadEngine, media_dir: Path, silence: Path) -> None:
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    path = media_dir / "no_face.png"
    cv2.imwrite(str(path), gradient)
    for mode in ("crop", "resize", "full"):
        with pytest.raises(NoFaceError, match="No face was found in the source image"):
            engine.run(TalkingHeadRequest(image=path, audio=silence, preprocess=mode))
    assert outputs_of(engine) == []


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (b"This is a text file, not a recording.\n" * 20, AudioFileError, "could not be read as audio"),
        (b"", EmptyAudioError, r"is empty \(0 bytes\)"),
    ],
)
def test_unusable_audio_files(
    engine: TalkingHeadEngine,
    astronaut_png: Path,
    tmp_path: Path,
    content: bytes,
    error: type[Exception],
    message: str,
) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(content)
    with pytest.raises(error, match=message) as caught:
        engine.run(TalkingHeadRequest(image=astronaut_png, audio=audio))
    assert "speech.wav" in str(caught.value)
    assert outputs_of(engine) == []


def test_audio_shorter_than_a_frame_and_missing_files(
    engine: TalkingHeadEngine, astronaut_png: Path, tmp_path: Path, silence: Path
) -> None:
    blip = write_wav(tmp_path / "blip.wav", np.zeros(400))  # 25 ms
    with pytest.raises(EmptyAudioError, match="too short"):
        engine.run(TalkingHeadRequest(image=astronaut_png, audio=blip))
    with pytest.raises(AudioFileError, match="was not found"):
        engine.run(TalkingHeadRequest(image=astronaut_png, audio=tmp_path / "missing.mp3"))
    not_an_image = tmp_path / "portrait.png"
    not_an_image.write_text("not an image")
    # Refused when the request is made (before any model loads), naming the field ...
    with pytest.raises(ValidationError, match="image: file not found"):
        TalkingHeadRequest(image=tmp_path / "missing.png", audio=silence)
    with pytest.raises(ValidationError, match="image: not an image file"):
        TalkingHeadRequest(image=not_an_image, audio=silence)
    # ... and by the engine itself when a file went missing or bad after that.
    with pytest.raises(ImageFileError, match="was not found"):
        engine.run(TalkingHeadRequest.model_construct(image=tmp_path / "missing.png", audio=silence))
    with pytest.raises(ImageFileError, match="could not be read as an image"):
        engine.run(TalkingHeadRequest.model_construct(image=not_an_image, audio=silence))
    assert outputs_of(engine) == []


@pytest.mark.parametrize("pose_style", [46, -1])
def test_pose_style_out_of_range_names_the_field(astronaut_png: Path, silence: Path, pose_style: int) -> None:
    with pytest.raises(ValidationError) as caught:
        TalkingHeadRequest(image=astronaut_png, audio=silence, pose_style=pose_style)
    assert caught.value.errors()[0]["loc"] == ("pose_style",)
    assert "pose_style" in str(caught.value)


def test_other_fields_are_validated(astronaut_png: Path, silence: Path) -> None:
    for field, value in (
        ("size", 384),
        ("preprocess", "stretch"),
        ("batch_size", 0),
        ("enhancer", "codeformer"),
    ):
        with pytest.raises(ValidationError) as caught:
            TalkingHeadRequest(image=astronaut_png, audio=silence, **{field: value})
        assert caught.value.errors()[0]["loc"] == (field,)


def test_failure_while_encoding_leaves_nothing_behind(
    engine: TalkingHeadEngine, astronaut_png: Path, silence: Path
) -> None:
    calls = []

    def failing_enhancer(frame: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("enhancer crashed")
        return frame

    request = TalkingHeadRequest(image=astronaut_png, audio=silence, enhancer="gfpgan")
    with pytest.raises(RuntimeError, match="enhancer crashed"):
        engine.run(request, enhance=failing_enhancer)
    assert len(calls) == 6
    assert outputs_of(engine) == []

    with pytest.raises(SadTalkerError, match="must return an RGB uint8 frame"):
        engine.run(request, enhance=lambda frame: frame.astype(np.float32))
    assert outputs_of(engine) == []
