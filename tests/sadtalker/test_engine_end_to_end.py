"""Portrait + speech -> MP4 through ``TalkingHeadEngine``, per preprocess mode (random-weight files).

Every network is the real one except the face generator (see ``helpers.CheapGenerator``): its
full-size forward is covered by ``test_engine_checkpoint_render.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from contract.talking_head import TalkingHeadRequest
from sadtalker.audio_io import load_audio
from sadtalker.engine import TalkingHeadEngine
from tests.sadtalker.helpers import decode_frames, files_in, probe, write_wav

FRAME = 1 / 25


@pytest.fixture(scope="module")
def short_tone(media_dir: Path) -> Path:
    """0.45 s of a vowel-like tone: 11 video frames."""
    t = np.arange(int(16000 * 0.45)) / 16000
    return write_wav(media_dir / "tone.wav", 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t))


def test_speech_to_mp4(engine: TalkingHeadEngine, astronaut_png: Path, speech_wav: Path) -> None:
    events: list[tuple[str, int, int]] = []
    request = TalkingHeadRequest(image=astronaut_png, audio=speech_wav, seed=3, batch_size=4)
    result = engine.run(request, on_progress=lambda stage, done, total: events.append((stage, done, total)))

    audio_seconds = len(load_audio(speech_wav).samples) / 16000
    info = probe(result.path)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["fps"] == 25
    assert info["audio_codecs"] == ["aac"]
    # 256 wide; the face box's aspect ratio (about square) sets the even height.
    assert info["width"] == 256 and info["height"] % 2 == 0 and abs(info["height"] - 256) <= 8
    assert info["frames"] in (None, result.frames)
    assert result.frames == int(audio_seconds * 25) and result.duration == result.frames / 25
    assert abs(info["duration"] - audio_seconds) <= FRAME

    assert result.path.parent == engine.outputs_root / "talking-head"
    assert files_in(result.path.parent) == sorted([result.path.name, result.sidecar.name])
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["parameters"]["seed"] == 3 and sidecar["parameters"]["preprocess"] == "crop"
    assert sidecar["frames"] == result.frames and sidecar["video"] == result.path.name
    assert sidecar["landmarks"] == "haar-template"
    assert set(result.stage_seconds) == {"load", "preprocess", "audio2coeff", "render", "enhance", "encode"}

    stages = [stage for stage, _, _ in events]
    assert {"preprocess", "audio2coeff", "render", "encode"} <= set(stages) and "enhance" not in stages
    assert ("render", result.frames, result.frames) in events
    assert events[-1] == ("encode", result.frames, result.frames)
    # Streaming: frames are encoded while later ones are still being rendered.
    first_encoded = stages.index("encode")
    last_rendered = len(stages) - 1 - stages[::-1].index("render")
    assert first_encoded < last_rendered


@pytest.mark.parametrize(
    ("mode", "expected_size"),
    [("extcrop", None), ("resize", (256, 214)), ("full", (480, 400)), ("extfull", (480, 400))],
)
def test_output_size_per_preprocess_mode(
    engine: TalkingHeadEngine,
    odd_photo: Path,
    short_tone: Path,
    mode: str,
    expected_size: tuple[int, int] | None,
) -> None:
    result = engine.run(TalkingHeadRequest(image=odd_photo, audio=short_tone, preprocess=mode, seed=1))
    info = probe(result.path)
    size = (info["width"], info["height"])
    if expected_size is None:  # the bordered face box is about square: 256 wide, even height near 256
        assert size[0] == 256 and size[1] % 2 == 0 and abs(size[1] - 256) <= 8
    else:
        assert size == expected_size
    assert info["audio_codecs"] == ["aac"] and result.frames == 11
    if mode in ("full", "extfull"):
        # Pasted back: away from the face the frame is the photo itself (up to H.264 loss).
        photo = cv2.cvtColor(cv2.imread(str(odd_photo)), cv2.COLOR_BGR2RGB)[:400, :480]
        frame = decode_frames(result.path)[5]
        corner = (slice(300, 400), slice(0, 100))
        assert np.abs(frame[corner].astype(int) - photo[corner].astype(int)).mean() < 4
