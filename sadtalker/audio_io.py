"""Decoding the driving audio: any format ffmpeg reads -> 16 kHz mono float32, as SadTalker expects.

The reference loaded audio with ``librosa.load(path, sr=16000)``: decode, average the channels, and
resample. We let the bundled ffmpeg decode and resample (with the SoX resampler when the build has it,
close to librosa's high-quality resampler) but keep every channel and average them here, because
ffmpeg's own down-mix weights channels by 1/sqrt(2) (mono would be 3 dB louder than librosa's mean,
which shifts the log-mel features the networks see).

The video length follows the reference: ``int(samples / 640)`` frames at 25 fps, i.e. a trailing
partial frame is dropped, and the video lasts ``frames / 25`` seconds.
"""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sadtalker.audio import DEFAULT_SETTINGS, video_frame_count
from sadtalker.errors import AudioFileError, EmptyAudioError
from sadtalker.ffmpeg import run_ffmpeg, stderr_tail

SAMPLE_RATE = DEFAULT_SETTINGS.sample_rate
FPS = DEFAULT_SETTINGS.fps
_WAVE_FLOAT = 3
_WAVE_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class DecodedAudio:
    """A mono waveform at :data:`SAMPLE_RATE` and the video length it drives."""

    samples: np.ndarray  # (n,) float32 in [-1, 1]
    source: Path

    @property
    def frame_count(self) -> int:
        """Whole 25 fps video frames covered by the audio (the reference's ``num_frames``)."""
        return video_frame_count(len(self.samples))

    @property
    def duration(self) -> float:
        """Seconds of video: ``frame_count / 25``."""
        return self.frame_count / FPS


def load_audio(path: Path) -> DecodedAudio:
    """Decode the first audio track of ``path`` to 16 kHz mono float32.

    Raises :class:`AudioFileError` (missing, not audio, unreadable) or :class:`EmptyAudioError`
    (0 bytes, no samples, shorter than one video frame). A silent recording is valid.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"Audio file {path} was not found. Check the path of the driving audio.")
    if path.stat().st_size == 0:
        raise EmptyAudioError(
            f"Audio file {path.name} is empty (0 bytes). Choose a speech recording (wav, mp3, m4a, ...)."
        )
    completed = _decode_to_wav(path, resampler="soxr")
    if completed.returncode != 0 and b"soxr" in completed.stderr.lower():
        completed = _decode_to_wav(path, resampler=None)  # an ffmpeg build without libsoxr
    if completed.returncode != 0:
        reason = stderr_tail(completed.stderr)
        if "matches no streams" in reason:
            raise AudioFileError(
                f"{path.name} has no audio track. Choose a speech recording (wav, mp3, m4a, ...)."
            )
        reason = reason or f"exit code {completed.returncode}"
        raise AudioFileError(
            f"{path.name} could not be read as audio (ffmpeg: {reason}). "
            "Choose a speech recording in a common format (wav, mp3, m4a, ogg, flac)."
        )
    try:
        samples = _mono_samples_from_wav(completed.stdout)
    except ValueError as exc:
        raise AudioFileError(f"{path.name}: ffmpeg returned unexpected audio data ({exc}).") from exc
    decoded = DecodedAudio(samples=samples, source=path)
    if samples.size == 0:
        raise EmptyAudioError(f"{path.name} holds no audio samples. Choose a recording with speech.")
    if decoded.frame_count == 0:
        raise EmptyAudioError(
            f"{path.name} is too short ({samples.size / SAMPLE_RATE * 1000:.0f} ms): a video needs at least "
            f"one frame of audio ({1000 // FPS} ms). Choose a longer recording."
        )
    return decoded


def _decode_to_wav(path: Path, resampler: str | None) -> subprocess.CompletedProcess[bytes]:
    resample = f"aresample={SAMPLE_RATE}" + (f":resampler={resampler}" if resampler else "")
    return run_ffmpeg(
        [
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-vn",
            "-af",
            resample,
            "-ar",
            str(SAMPLE_RATE),
            "-c:a",
            "pcm_f32le",
            "-f",
            "wav",
            "pipe:1",
        ]
    )


def _mono_samples_from_wav(data: bytes) -> np.ndarray:
    """Interleaved float32 WAV bytes (as ffmpeg writes them to a pipe) -> the channel mean.

    On a pipe ffmpeg cannot go back to fill in the chunk sizes, so the data chunk is taken to run to
    the end of the stream.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    position, channels, sample_rate = 12, 0, 0
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (chunk_size,) = struct.unpack_from("<I", data, position + 4)
        body = position + 8
        if chunk_id == b"fmt ":
            audio_format, channels, sample_rate = struct.unpack_from("<HHI", data, body)
            if audio_format not in (_WAVE_FLOAT, _WAVE_EXTENSIBLE):
                raise ValueError(f"sample format {audio_format} instead of 32-bit float")
        elif chunk_id == b"data":
            if channels <= 0:
                raise ValueError("data before the format chunk")
            if sample_rate != SAMPLE_RATE:
                raise ValueError(f"{sample_rate} Hz instead of {SAMPLE_RATE} Hz")
            payload = data[body:]
            usable = len(payload) - len(payload) % (4 * channels)
            interleaved = np.frombuffer(payload[:usable], dtype="<f4").reshape(-1, channels)
            mono = interleaved.mean(axis=1, dtype=np.float64) if channels > 1 else interleaved[:, 0]
            return np.ascontiguousarray(mono, dtype=np.float32)
        position = body + chunk_size + (chunk_size & 1)
    raise ValueError("no data chunk")
