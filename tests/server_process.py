"""Helpers for tests that start ``launch.py`` as a real server process on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen, limit: float = 180.0) -> None:
    """Poll ``url`` until it answers 200; fail at once if the server process exits."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, "the studio exited during startup"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            # wait 0.2 s between attempts, noticing at once if the server dies
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.2)
    raise AssertionError(f"{url} did not answer within {limit}s")


@contextlib.contextmanager
def studio_process(
    args: list[str], work: Path, *, entry: tuple[str, ...] = ("launch.py",)
) -> Iterator[tuple[str, Path]]:
    """Start the studio (``python launch.py`` or another ``entry``, e.g. ``-m module``) on a free
    loopback port with ``args``; yield its URL and log file once it answers, stop it afterwards."""
    port = free_port()
    log_path = work / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, *entry, "--port", str(port), *args],
            cwd=ROOT,
            env={
                **os.environ,
                "SDSTUDIO_SKIP_VENV": "1",
                "HF_HUB_OFFLINE": "1",
                "GRADIO_ANALYTICS_ENABLED": "False",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_until_up(url, process)
            yield url, log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
