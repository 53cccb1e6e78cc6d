"""Helpers for tests that start ``launch.py`` as a real server process on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request


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
