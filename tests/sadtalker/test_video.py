"""H.264 writing through ffmpeg's stdin, audio muxing, atomic publishing and cleanup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sadtalker.errors import VideoEncodingError
from sadtalker.video import H264Writer, discard, mux_audio, publish, temporary_path
from tests.sadtalker.helpers import decode_frames, files_in, probe, write_wav


def gradient_frame(index: int, width: int = 64, height: int = 48) -> np.ndarray:
    ys, xs = np.indices((height, width))
    return np.stack([(xs * 4 + index * 8) % 256, ys * 5, np.full_like(xs, 128)], axis=-1).astype(np.uint8)


def test_writer_and_mux(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with H264Writer(silent, 64, 48) as writer:
        for index in range(10):
            writer.write(gradient_frame(index))
    assert writer.frames_written == 10
    info = probe(silent)
    assert (info["video_codec"], info["pix_fmt"], info["fps"]) == ("h264", "yuv420p", 25)
    assert (info["width"], info["height"]) == (64, 48) and info["audio_codecs"] == []
    frames = decode_frames(silent)
    assert frames.shape == (10, 48, 64, 3)
    assert np.abs(frames[3].astype(int) - gradient_frame(3).astype(int)).mean() < 6

    t = np.arange(16000) / 16000
    audio = write_wav(tmp_path / "speech.wav", 0.3 * np.sin(2 * np.pi * 300 * t))  # 1 s: longer
    final = tmp_path / "final.mp4"
    mux_audio(silent, audio, final, duration=0.4)
    info = probe(final)
    assert info["audio_codecs"] == ["aac"] and info["video_codec"] == "h264"
    assert abs(info["duration"] - 0.4) <= 1 / 25


def test_writer_rejects_bad_sizes_and_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even dimensions"):
        H264Writer(tmp_path / "odd.mp4", 63, 48)
    writer = H264Writer(tmp_path / "v.mp4", 64, 48)
    with pytest.raises(ValueError, match="does not match"):
        writer.write(np.zeros((48, 64, 3), dtype=np.float32))
    writer.abort()


def test_an_exception_inside_the_writer_stops_ffmpeg(tmp_path: Path) -> None:
    path = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError, match="render failed"), H264Writer(path, 64, 48) as writer:
        writer.write(gradient_frame(0))
        raise RuntimeError("render failed")
    assert writer._process.poll() is not None  # the encoder is not left running
    discard(path)
    assert files_in(tmp_path) == []


def test_encoder_failures_are_reported(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with H264Writer(silent, 64, 48) as writer:
        writer.write(gradient_frame(0))
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("hello")
    with pytest.raises(VideoEncodingError, match="Adding the audio to the video failed"):
        mux_audio(silent, not_audio, tmp_path / "out.mp4", duration=0.04)
    # ffmpeg cannot create the output: the error comes at close (or at the first write).
    with (
        pytest.raises(VideoEncodingError, match="video encoder"),
        H264Writer(tmp_path / "missing-folder" / "v.mp4", 64, 48) as broken,
    ):
        for index in range(50):
            broken.write(gradient_frame(index))


def test_publish_is_a_rename_and_temporaries_are_hidden(tmp_path: Path) -> None:
    final = tmp_path / "video.mp4"
    temporary = temporary_path(final, "muxed.mp4")
    assert temporary.parent == tmp_path and temporary.name.startswith(".video.")
    temporary.write_bytes(b"data")
    publish(temporary, final)
    assert final.read_bytes() == b"data" and not temporary.exists()
    discard(temporary, tmp_path / "never-existed.mp4")  # missing files are fine
