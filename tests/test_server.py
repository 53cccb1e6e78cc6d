"""The UI process as a user starts it: ``python launch.py``, then generate through its HTTP API."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_process import studio_process


@pytest.fixture(scope="module")
def server(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("server")
    args = [
        *("--models-dir", str(tiny_models_root), "--data-dir", str(work / "data")),
        *("--outputs-dir", str(work / "outputs"), "--ckpt", "tiny-sd1"),
    ]
    with studio_process(args, work) as (url, _):
        yield url, work


def test_ui_answers_without_loading_a_model(server: tuple[str, Path]) -> None:
    url, work = server
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode("utf-8", "replace")
    assert "SD Studio" in page
    assert "loaded tiny-sd1" not in (work / "server.log").read_text()
