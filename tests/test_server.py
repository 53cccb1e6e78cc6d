"""The UI process as a user starts it: ``python launch.py``, then generate through its HTTP API."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import free_port, wait_until_up

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (work / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "launch.py",
            "--port",
            str(port),
            "--models-dir",
            str(tiny_models_root),
            "--data-dir",
            str(work / "data"),
            "--outputs-dir",
            str(work / "outputs"),
            "--ckpt",
            "tiny-sd1",
        ],
        cwd=ROOT,
        env={**os.environ, "SDSTUDIO_SKIP_VENV": "1", "HF_HUB_OFFLINE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process)
        yield url, work
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_ui_answers_without_loading_a_model(server: tuple[str, Path]) -> None:
    url, work = server
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode("utf-8", "replace")
    assert "SD Studio" in page
    assert "loaded tiny-sd1" not in (work / "server.log").read_text()
