"""Helpers for the talking-head tests: a cheap generator stand-in, WAV writing, media probing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheapGenerator:
    """Stands in for ``WarpingSpadeGenerator``: the source brightened by the keypoints' mean motion.

    Frames still depend on every coefficient (pose and expression move the driving keypoints), so
    seeds, batching and ranges are meaningfully tested, at a negligible cost.
    """

    def encode_source(self, source_image: torch.Tensor) -> torch.Tensor:
        return source_image

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        motion = (driving_kp - source_kp).mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return {"prediction": (source_volume + 4 * motion).clamp(0, 1)}


class GatedGenerator(CheapGenerator):
    """The cheap stand-in; while ``gate`` is closed, a render waits (``rendering`` says one started)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.rendering = threading.Event()

    def render(
        self, source_volume: torch.Tensor, driving_kp: torch.Tensor, source_kp: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        self.rendering.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return super().render(source_volume, driving_kp, source_kp)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """16-bit PCM WAV from float samples in [-1, 1] (mono ``(n,)`` or interleaved ``(n, channels)``)."""
    data = np.asarray(samples, dtype=np.float64)
    channels = 1 if data.ndim == 1 else data.shape[1]
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(data, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def probe(path: Path) -> dict[str, object]:
    """Streams and duration of a media file: ffprobe (Debian ``ffmpeg``) or, without it, ``ffmpeg -i``."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe:
        out = subprocess.run(
            [ffprobe, "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
            check=True,
            capture_output=True,
        ).stdout
        info = json.loads(out)
        video = next(s for s in info["streams"] if s["codec_type"] == "video")
        audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
        numerator, denominator = video["r_frame_rate"].split("/")
        return {
            "video_codec": video["codec_name"],
            "pix_fmt": video["pix_fmt"],
            "width": int(video["width"]),
            "height": int(video["height"]),
            "fps": int(numerator) / int(denominator),
            "frames": int(video["nb_frames"]),
            "audio_codecs": [s["codec_name"] for s in audio],
            "duration": float(info["format"]["duration"]),
        }
    from sadtalker.ffmpeg import ffmpeg_executable

    text = subprocess.run(
        [ffmpeg_executable(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    ).stderr
    video_line = re.search(r"Video: (\w+).*?, (\w+)\(?.*?, (\d+)x(\d+).*?, ([\d.]+) fps", text)
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text).groups()
    assert video_line, text
    return {
        "video_codec": video_line.group(1),
        "pix_fmt": video_line.group(2),
        "width": int(video_line.group(3)),
        "height": int(video_line.group(4)),
        "fps": float(video_line.group(5)),
        "frames": None,
        "audio_codecs": re.findall(r"Audio: (\w+)", text),
        "duration": int(hours) * 3600 + int(minutes) * 60 + float(seconds),
    }


def decode_frames(path: Path) -> np.ndarray:
    """All frames of a video as ``(n, h, w, 3)`` uint8."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames)


def files_in(folder: Path) -> list[str]:
    """Every file (hidden ones included) under ``folder``, relative, sorted."""
    if not folder.exists():
        return []
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def one_worker_render(models_root: Path, outputs: Path, request: Any) -> Path:
    """``request`` rendered by one engine in this process with the cheap stand-in generator."""
    from sadtalker.engine import TalkingHeadEngine

    engine = TalkingHeadEngine(models_root, outputs, device="cpu")
    engine.models(256).generator = CheapGenerator()
    return engine.run(request).path
