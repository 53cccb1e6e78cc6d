"""The real server, started as users start it (``launch.py --api ...``) on a free loopback port.

One server with the UI, the API and both kinds of auth is shared by the API test files (starting
one costs the imports of torch, diffusers and gradio). Its models folder holds the tiny SD1 and
SD1-inpainting checkpoints, a tiny ControlNet, and ``evil.ckpt``: a pickle whose unpickling would
create ``PICKLE_MARKER``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.server_process import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
API_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
UI_USER = ("painter", "ui-secret")
STARTUP_LIMIT = 240.0
SMALL = {"width": 64, "height": 64, "steps": 2}


@dataclass
class StudioServer:
    """A ``launch.py`` process; ``stop`` terminates it, ``kill`` is ``kill -9``."""

    args: list[str]
    work: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_path: str = "/studio/v1/health", auth: tuple[str, str] | None = None) -> None:
        self.log_path = self.work / f"server-{int(time.time() * 1000)}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "launch.py", "--port", str(self.port), *self.args],
                cwd=ROOT,
                env={**os.environ, "SDSTUDIO_SKIP_VENV": "1", "HF_HUB_OFFLINE": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if requests.get(self.url + ready_path, auth=auth, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.3)
        raise AssertionError(f"{self.url} did not answer within {STARTUP_LIMIT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class CodeRunningPayload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a .ckpt could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def write_malicious_checkpoint(path: Path, marker: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "x": None}}
    state["state_dict"]["x"] = CodeRunningPayload(marker)
    with path.open("wb") as handle:
        torch.save(state, handle)
    assert not marker.exists()


def write_tiny_controlnet(diffusers_sd1: Path, target: Path) -> None:
    """A ControlNet copied from the tiny SD1 UNet, saved as a diffusers folder."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(diffusers_sd1, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.5)
    controlnet.save_pretrained(target, safe_serialization=True)


@pytest.fixture(scope="session")
def api_models_root(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder of our own (the shared one must not get evil.ckpt), linking the tiny files."""
    root = tmp_path_factory.mktemp("api-models")
    checkpoints = root / "Stable-diffusion"
    checkpoints.mkdir()
    for name in ("tiny-sd1", "tiny-sd1-inpaint"):
        for suffix in (".safetensors", ".yaml"):
            source = tiny_models_root / "Stable-diffusion" / f"{name}{suffix}"
            if source.exists():
                (checkpoints / source.name).symlink_to(source)
    write_malicious_checkpoint(checkpoints / "evil.ckpt", root.parent / "PICKLE_MARKER")
    write_tiny_controlnet(
        tiny_models_root / "Stable-diffusion" / "tiny-sd1-diffusers", root / "ControlNet" / "tiny-cn"
    )
    return root


@pytest.fixture(scope="session")
def pickle_marker(api_models_root: Path) -> Path:
    return api_models_root.parent / "PICKLE_MARKER"


@pytest.fixture(scope="session")
def studio_server(api_models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudioServer]:
    """``--api`` with the UI mounted, ``--auth`` for the UI and ``--api-auth`` for the API."""
    work = tmp_path_factory.mktemp("api-server")
    api_auth = ",".join(f"{user}:{password}" for user, password in API_USERS.items())
    server = StudioServer(
        args=[
            "--api",
            "--api-auth",
            api_auth,
            "--auth",
            ":".join(UI_USER),
            "--models-dir",
            str(api_models_root),
            "--data-dir",
            str(work / "data"),
            "--outputs-dir",
            str(work / "outputs"),
            "--ckpt",
            "tiny-sd1",
            "--max-upload-mb",
            "1",
        ],
        work=work,
    )
    server.start(auth=("alice", API_USERS["alice"]))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def alice() -> requests.Session:
    session = requests.Session()
    session.auth = ("alice", API_USERS["alice"])
    return session


@pytest.fixture()
def bob() -> requests.Session:
    session = requests.Session()
    session.auth = ("bob", API_USERS["bob"])
    return session


def record_finished_output(data_dir: Path, owner: str, path: Path) -> None:
    """A finished job of ``owner`` that wrote ``path``, in the job store of ``data_dir`` (inserted
    finished in one statement: a queued row could be run by a running queue)."""
    import json
    import sqlite3
    import time
    import uuid

    with sqlite3.connect(data_dir / "jobs.sqlite3", timeout=30) as db:
        db.execute(
            "INSERT INTO jobs (id, owner, kind, request, state, created, finished, outputs, result) "
            "VALUES (?, ?, 'txt2img', '{}', 'done', ?, ?, ?, ?)",
            (
                uuid.uuid4().hex,
                owner,
                time.time(),
                time.time(),
                json.dumps([str(path)]),
                json.dumps({"images": [str(path)]}),
            ),
        )
