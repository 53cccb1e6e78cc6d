"""The studio as users meet it: ``launch.py`` in a subprocess over the tiny models, with two
accounts (one from ``--auth``, one from ``--auth-file``), driven by Debian's headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server_process import ROOT, studio_process

ARTIFACTS = ROOT / "test-artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
USERS = {"alice": "wonderland", "bob": "builder"}


@dataclass(frozen=True)
class RunningStudio:
    url: str
    work: Path
    log: Path

    @property
    def outputs(self) -> Path:
        return self.work / "outputs"


@pytest.fixture(scope="module")
def studio_server(
    tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStudio]:
    work = tmp_path_factory.mktemp("ui-server")
    (work / "users.txt").write_text("bob:builder\n", encoding="utf-8")
    args = [
        *("--models-dir", str(tiny_models_root), "--data-dir", str(work / "data")),
        *("--outputs-dir", str(work / "outputs"), "--ckpt", "tiny-sd1"),
        *("--auth", "alice:wonderland", "--auth-file", str(work / "users.txt")),
    ]
    with studio_process(args, work) as (url, log):
        yield RunningStudio(url=url, work=work, log=log)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
