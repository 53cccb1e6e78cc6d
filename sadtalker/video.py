"""Frames -> an H.264 MP4 with the speech as AAC, written so a reader never sees half a file.

* :class:`H264Writer` feeds raw RGB frames to the bundled ffmpeg on its stdin (libx264, yuv420p,
  25 fps): frames are encoded as they are rendered and never collected in memory.
* :func:`mux_audio` copies that video stream and adds the driving audio as AAC, cut to the video's
  length (the reference cut its 16 kHz copy to ``frames / 25`` seconds the same way).
* Both steps write hidden temporary files next to the final one; :func:`publish` fsyncs and
  ``os.replace``s the result into place, and :func:`discard` removes leftovers after a failure.
* :func:`paste_into_photo` is the full modes' paste-back: the rendered face resized to the region it
  came from and blended into the original photo with ``cv2.seamlessClone`` (as the reference).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

from sadtalker.errors import VideoEncodingError
from sadtalker.ffmpeg import base_command, run_ffmpeg, stderr_tail

FPS = 25
# x264 quality: visually lossless for talking heads at a modest size; "medium" is x264's default speed.
X264_CRF = 18
X264_PRESET = "medium"
AAC_BITRATE = "160k"


def temporary_path(final: Path, suffix: str) -> Path:
    """A hidden, unique file name next to ``final`` (same file system, so the final rename is atomic)."""
    return final.with_name(f".{final.stem}.{secrets.token_hex(4)}.{suffix}")


class H264Writer:
    """Encodes ``(height, width, 3)`` RGB uint8 frames, one :meth:`write` at a time, into an MP4."""

    def __init__(self, path: Path, width: int, height: int, fps: int = FPS) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 in yuv420p needs even dimensions, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.frames_written = 0
        # A file, not a pipe: ffmpeg must never block on a full stderr pipe while we feed stdin.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()/abort()
        command = [
            *base_command(),
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            "pipe:0",
            "-an",
            "-c:v",
            "libx264",
            "-preset",
            X264_PRESET,
            "-crf",
            str(X264_CRF),
            "-pix_fmt",
            "yuv420p",
            "-r",
            str(fps),
            "-f",
            "mp4",
            str(self.path),
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} does not match the video's "
                f"({self.height}, {self.width}, 3) uint8"
            )
        stdin = self._process.stdin
        if stdin is None:
            raise VideoEncodingError("The video encoder is already closed.")
        try:
            stdin.write(np.ascontiguousarray(frame).tobytes())
        except (BrokenPipeError, OSError) as exc:
            self._process.wait()
            raise VideoEncodingError(
                f"The video encoder (ffmpeg) stopped after {self.frames_written} frames: {self._error_text()}"
            ) from exc
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file; raises :class:`VideoEncodingError` if ffmpeg failed."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._process.stdin.close()
        code = self._process.wait()
        error = self._error_text()
        self._stderr.close()
        if code != 0:
            raise VideoEncodingError(f"The video encoder (ffmpeg) failed with exit code {code}: {error}")

    def abort(self) -> None:
        """Stop ffmpeg without finishing the file (the caller removes it)."""
        if self._process.poll() is None:
            self._process.kill()
        if self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._process.stdin.close()
        self._process.wait()
        self._stderr.close()

    def _error_text(self) -> str:
        try:
            self._stderr.seek(0)
            return stderr_tail(self._stderr.read()) or "no error message"
        except (OSError, ValueError):
            return "no error message"

    def __enter__(self) -> H264Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def mux_audio(video: Path, audio: Path, output: Path, duration: float) -> None:
    """``output`` = ``video``'s stream (copied) + ``audio``'s first track as AAC, both cut to ``duration``."""
    completed = run_ffmpeg(
        [
            "-y",
            "-i",
            str(video),
            "-i",
            str(audio),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-b:a",
            AAC_BITRATE,
            "-t",
            f"{duration:.6f}",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            str(output),
        ]
    )
    if completed.returncode != 0:
        raise VideoEncodingError(
            f"Adding the audio to the video failed (ffmpeg exit code {completed.returncode}): "
            f"{stderr_tail(completed.stderr) or 'no error message'}"
        )


def publish(temporary: Path, final: Path) -> None:
    """fsync ``temporary`` and rename it onto ``final`` atomically."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def discard(*paths: Path) -> None:
    """Remove temporary files, ignoring those already gone."""
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)


def paste_into_photo(frame: np.ndarray, photo: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The rendered face resized to ``region`` ``(x1, y1, x2, y2)`` and Poisson-blended into ``photo``."""
    import cv2

    x1, y1, x2, y2 = region
    patch = cv2.resize(frame, (x2 - x1, y2 - y1))
    if min(patch.shape[:2]) < 3:
        return photo.copy()
    mask = np.full(patch.shape, 255, dtype=np.uint8)
    centre = ((x1 + x2) // 2, (y1 + y2) // 2)
    return cv2.seamlessClone(patch, photo, mask, centre, cv2.NORMAL_CLONE)


def fit_frame(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """``frame`` at exactly ``width x height``: cut (a last odd row/column) or resized."""
    import cv2

    frame_height, frame_width = frame.shape[:2]
    if (frame_width, frame_height) == (width, height):
        return frame
    if (
        frame_width >= width
        and frame_height >= height
        and frame_width - width <= 1
        and frame_height - height <= 1
    ):
        return frame[:height, :width]
    interpolation = cv2.INTER_AREA if frame_width > width else cv2.INTER_LINEAR
    return cv2.resize(frame, (width, height), interpolation=interpolation)
