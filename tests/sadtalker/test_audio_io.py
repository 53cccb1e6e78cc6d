"""Decoding any audio with the bundled ffmpeg to 16 kHz mono, the reference's frame count, clear errors."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sadtalker.audio_io import _mono_samples_from_wav, load_audio
from sadtalker.errors import AudioFileError, EmptyAudioError
from sadtalker.ffmpeg import run_ffmpeg
from sadtalker.video import H264Writer
from tests.sadtalker.helpers import write_wav


def tone(rate: int, seconds: float, frequency: float = 440.0, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


def test_stereo_is_averaged_and_resampled(tmp_path: Path) -> None:
    left = tone(44100, 1.0)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, np.zeros_like(left)], axis=1), rate=44100)
    decoded = load_audio(path)
    assert decoded.samples.dtype == np.float32
    assert abs(len(decoded.samples) - 16000) <= 2
    # librosa's mono is the channel mean: half the left channel's amplitude (not ffmpeg's 1/sqrt 2).
    steady = decoded.samples[1000:-1000]
    assert np.abs(steady).max() == pytest.approx(0.2, abs=0.005)
    assert decoded.frame_count == 25 and decoded.duration == 1.0


def test_mono_16k_is_passed_through(tmp_path: Path) -> None:
    samples = tone(16000, 0.5)
    decoded = load_audio(write_wav(tmp_path / "mono.wav", samples))
    np.testing.assert_allclose(decoded.samples, samples, atol=1.5 / 32768)


def test_frame_count_drops_a_partial_frame(tmp_path: Path) -> None:
    decoded = load_audio(write_wav(tmp_path / "a.wav", np.zeros(16000 + 639)))
    assert decoded.frame_count == 25 and decoded.duration == 1.0  # int(16639 / 640)


@pytest.mark.parametrize(("extension", "codec"), [("flac", "flac"), ("m4a", "aac"), ("ogg", "libvorbis")])
def test_compressed_formats(tmp_path: Path, extension: str, codec: str) -> None:
    source = write_wav(tmp_path / "source.wav", tone(22050, 1.2), rate=22050)
    encoded = tmp_path / f"speech.{extension}"
    completed = run_ffmpeg(["-y", "-i", str(source), "-c:a", codec, str(encoded)])
    if completed.returncode != 0 and codec == "libvorbis":  # a build without libvorbis: use Opus
        encoded = tmp_path / "speech.opus"
        completed = run_ffmpeg(["-y", "-i", str(source), "-c:a", "libopus", str(encoded)])
    assert completed.returncode == 0, completed.stderr
    decoded = load_audio(encoded)
    assert abs(decoded.frame_count - 30) <= 1


def test_not_audio(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioFileError, match=r"notes\.mp3 could not be read as audio") as caught:
        load_audio(text)
    assert "0x" not in str(caught.value)  # ffmpeg's context addresses are stripped

    video = tmp_path / "silent_film.mp4"
    with H264Writer(video, 32, 32) as writer:
        for _ in range(3):
            writer.write(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(AudioFileError, match="has no audio track"):
        load_audio(video)


def test_empty_and_too_short(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match=r"empty \(0 bytes\)"):
        load_audio(empty)
    no_samples = write_wav(tmp_path / "nothing.wav", np.zeros(0))
    with pytest.raises(EmptyAudioError, match="holds no audio samples"):
        load_audio(no_samples)
    with pytest.raises(EmptyAudioError, match=r"too short \(25 ms\)"):
        load_audio(write_wav(tmp_path / "blip.wav", np.zeros(400)))
    with pytest.raises(AudioFileError, match="was not found"):
        load_audio(tmp_path / "missing.wav")


def test_wav_stream_parsing_skips_extra_chunks() -> None:
    samples = np.array([[0.5, -0.5], [0.25, 0.75], [1.0, 0.0]], dtype="<f4")
    fmt = struct.pack("<HHIIHH", 3, 2, 16000, 16000 * 8, 8, 32)
    info = b"INFOISFT\x03\x00\x00\x00abc\x00"  # an odd-sized sub-chunk
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"LIST" + struct.pack("<I", len(info)) + info
    chunks += b"data" + struct.pack("<I", 0xFFFFFFFF) + samples.tobytes()  # size unknown on a pipe
    stream = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + chunks
    np.testing.assert_allclose(_mono_samples_from_wav(stream), [0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="RIFF"):
        _mono_samples_from_wav(b"OggS" + bytes(20))


def test_engine_modules_import_without_torch() -> None:
    modules = "sadtalker.audio_io, sadtalker.preprocess, sadtalker.coefficients, sadtalker.render"
    code = f"import sys, {modules}, sadtalker.video, sadtalker.engine; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
