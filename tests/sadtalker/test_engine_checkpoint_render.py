"""The whole engine with every real network, the full-size face generator included (1 frame).

The generator costs 15-40 s per 256-pixel frame on the CI's shared CPUs, so this is the only test that runs it
through the engine; the other engine tests use a stand-in (see ``helpers.CheapGenerator``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.talking_head import TalkingHeadRequest
from sadtalker.engine import TalkingHeadEngine
from sadtalker.networks.generator import WarpingSpadeGenerator
from tests.sadtalker.helpers import decode_frames, probe, write_wav


def test_one_frame_with_the_real_generator(
    sadtalker_models_root: Path, astronaut_png: Path, tmp_path: Path
) -> None:
    engine = TalkingHeadEngine(sadtalker_models_root, tmp_path / "outputs", device="cpu")
    assert isinstance(engine.models(256).generator, WarpingSpadeGenerator)
    t = np.arange(1000) / 16000  # 62 ms: 1 video frame
    audio = write_wav(tmp_path / "short.wav", 0.3 * np.sin(2 * np.pi * 200 * t))
    rendered: list[int] = []
    result = engine.run(
        TalkingHeadRequest(image=astronaut_png, audio=audio, batch_size=1, seed=0),
        on_progress=lambda stage, done, total: rendered.append(done) if stage == "render" else None,
    )
    assert result.frames == 1 and rendered == [0, 1]
    info = probe(result.path)
    assert info["video_codec"] == "h264" and info["audio_codecs"] == ["aac"] and info["width"] == 256
    frames = decode_frames(result.path)
    assert frames.shape[0] == 1 and frames.std() > 0  # random weights, but a real picture
