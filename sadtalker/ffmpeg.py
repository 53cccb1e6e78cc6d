"""The ffmpeg binary shipped by ``imageio-ffmpeg`` (no system ffmpeg needed) and checked runs of it."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

# How much of ffmpeg's error output an error message quotes (the tail holds the actual reason).
_STDERR_SHOWN = 600
# ffmpeg prefixes messages with the emitting context and its address, e.g. "[in#0 @ 0x55d...]".
_CONTEXT_PREFIX = re.compile(r"\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")


def ffmpeg_executable() -> str:
    """Path of the ffmpeg binary bundled with the ``imageio-ffmpeg`` package.

    ``IMAGEIO_FFMPEG_EXE`` (honoured by imageio-ffmpeg) lets a user point at another build.
    """
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def base_command() -> list[str]:
    """ffmpeg with no stdin interaction, no banner and only errors on stderr."""
    return [ffmpeg_executable(), "-nostdin", "-hide_banner", "-loglevel", "error"]


def stderr_tail(stderr: bytes | str, limit: int = _STDERR_SHOWN) -> str:
    """The end of ffmpeg's stderr (where the reason is), decoded and trimmed for an error message."""
    text = stderr.decode("utf-8", errors="replace") if isinstance(stderr, bytes) else stderr
    text = " ".join(_CONTEXT_PREFIX.sub("", text).strip().split())
    return text if len(text) <= limit else "..." + text[-limit:]


def run_ffmpeg(arguments: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ffmpeg with ``arguments`` (after the base options), capturing stdout and stderr.

    The exit code is returned, not raised: callers phrase the failure in their user's terms.
    """
    return subprocess.run([*base_command(), *arguments], capture_output=True, check=False)
