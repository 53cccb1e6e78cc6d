"""The studio cluster as a user starts it from the README, on two "PCs" made on this machine.

``launch.py --listen --api --cluster-head`` runs in its own process namespace; the second PC is a
network namespace joined to this machine by a virtual Ethernet pair (its own address, its own ports,
its own ``/tmp/ray``) running the exact ``--cluster-join ... --cluster-token ...`` command the head
printed, with its own empty ``models/``. Checked: the second PC joins and gets the checkpoint from
the head; a job's batches run on both PCs through the API with ``--auth``; after the head is stopped
with Ctrl+C and started again, the queue is back and the second PC has joined again by itself.

Needs root (network and mount namespaces), ``ip`` and ``unshare``; skipped otherwise (CI runs as
root). Ports 6379-6385 and 10002-10100 of this machine must be free (the documented fixed ports).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cluster.launcher import PORTS

ROOT = Path(__file__).resolve().parent.parent
AUTH = ("artist", "secret")


def _can_run() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (requirements-cluster.txt)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for network namespaces"
    if not (shutil.which("ip") and shutil.which("unshare")):
        return "needs ip and unshare"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORTS["gcs"])) == 0:
            return f"port {PORTS['gcs']} is taken on this machine"
    namespaces = ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "true"]
    if subprocess.run(namespaces, capture_output=True, check=False).returncode != 0:
        return "PID and mount namespaces are not available here"
    return None


WHY_NOT = _can_run()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Pc:
    """A process tree in its own PID namespace (``ray stop`` there sees only its own processes);
    stopping its first process ends every process of the namespace."""

    def __init__(self, command: list[str], log: Path, netns: str | None = None) -> None:
        self.log = log
        prefix = ["ip", "netns", "exec", netns] if netns else []
        env = {**os.environ, "SDSTUDIO_SKIP_VENV": "1", "PYTHONUNBUFFERED": "1"}
        env = {key: value for key, value in env.items() if not key.startswith("RAY_")}
        self.outer = subprocess.Popen(
            [*prefix, "unshare", "--pid", "--fork", "--mount-proc", "--mount", *command],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )

    def inner_pid(self) -> int:
        for _ in range(100):
            found = subprocess.run(
                ["pgrep", "-P", str(self.outer.pid)], capture_output=True, text=True
            ).stdout.split()
            if found:
                return int(found[0])
            time.sleep(0.1)
        raise AssertionError("the namespace's first process did not start")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, since: int = 0, timeout: float = 600) -> re.Match[str]:
        deadline = time.monotonic() + timeout  # a bound on waiting, not a speed requirement
        while time.monotonic() < deadline:
            match = re.compile(pattern).search(self.text(), since)
            if match:
                return match
            if self.outer.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"never saw {pattern!r}; log:\n{self.text()[-4000:]}")

    def interrupt(self) -> None:
        """Ctrl+C to the studio (the namespace's python)."""
        os.kill(self.inner_pid(), signal.SIGINT)
        self.outer.wait(180)

    def kill(self) -> None:
        if self.outer.poll() is None:
            with contextlib.suppress(AssertionError, ProcessLookupError):
                os.kill(self.inner_pid(), signal.SIGKILL)  # ends the whole PID namespace
            self.outer.kill()
            self.outer.wait(60)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A namespace ``pc2`` at 10.231.N.2, wired to this machine (10.231.N.1) by a veth pair."""
    name = f"sdstudio-{uuid.uuid4().hex[:6]}"
    subnet = f"10.231.{os.getpid() % 250}"
    host_end, pc_end = f"{name[:9]}h", f"{name[:9]}p"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", pc_end)
        _run("ip", "link", "set", pc_end, "netns", name)
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", host_end)
        _run("ip", "link", "set", host_end, "up")
        for command in (
            ("ip", "addr", "add", f"{subnet}.2/24", "dev", pc_end),
            ("ip", "link", "set", pc_end, "up"),
            ("ip", "link", "set", "lo", "up"),
            ("ip", "route", "add", "default", "via", f"{subnet}.1"),
        ):
            _run("ip", "netns", "exec", name, *command)
    except subprocess.CalledProcessError as exc:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        pytest.skip(f"network namespaces are not available here: {exc.stderr.strip()}")
    try:
        yield {"netns": name, "pc2_ip": f"{subnet}.2"}
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["ip", "link", "delete", host_end], capture_output=True)


def _api(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    response = httpx.request(method, f"http://127.0.0.1:{port}{path}", json=body, auth=AUTH, timeout=600)
    assert response.status_code < 300, response.text
    return response.json()


def _wait_done(port: int, job: str) -> dict[str, Any]:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = _api(port, "GET", f"/studio/v1/jobs/{job}")
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish")


def test_two_pcs_from_the_readme_commands(
    network: dict[str, str], tiny_models_root: Path, tmp_path: Path
) -> None:
    import httpx

    head_models = tmp_path / "head" / "models" / "Stable-diffusion"
    head_models.mkdir(parents=True)
    for name in ("tiny-sd1.safetensors", "tiny-sd1.yaml"):
        shutil.copy(tiny_models_root / "Stable-diffusion" / name, head_models / name)
    (tmp_path / "pc2" / "models").mkdir(parents=True)
    (tmp_path / "pc2-ray").mkdir()
    port = _free_port()
    head_command = [
        sys.executable,
        "launch.py",
        "--listen",
        "--api",
        "--auth",
        ":".join(AUTH),
        "--port",
        str(port),
        "--cluster-head",
        "--models-dir",
        str(tmp_path / "head" / "models"),
        "--data-dir",
        str(tmp_path / "head" / "data"),
        "--outputs-dir",
        str(tmp_path / "head" / "outputs"),
        "--ckpt",
        "tiny-sd1",
    ]
    pcs: list[Pc] = []
    try:
        head = Pc(head_command, tmp_path / "head.log")
        pcs.append(head)
        join = head.wait_for(r"launch\.py (--cluster-join \S+ --cluster-token \S+)").group(1).split()
        head.wait_for(r"SD Studio is ready")
        pc2_command = [
            "bash",
            "-c",
            f'mount --bind {tmp_path / "pc2-ray"} /tmp/ray && exec "$@"',
            "pc2",
            sys.executable,
            "launch.py",
            *join,
            "--models-dir",
            str(tmp_path / "pc2" / "models"),
            "--data-dir",
            str(tmp_path / "pc2" / "data"),
        ]
        Path("/tmp/ray").mkdir(exist_ok=True)
        pc2 = Pc(pc2_command, tmp_path / "pc2.log", netns=network["netns"])
        pcs.append(pc2)
        head.wait_for(rf"cluster node {re.escape(network['pc2_ip'])} joined")

        assert httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=60).status_code == 401
        request = {"mode": "txt2img", "prompt": "two pcs", "steps": 60, "width": 64, "height": 64}
        job = _api(port, "POST", "/studio/v1/jobs", request | {"n_iter": 4, "seed": 5})["id"]
        workers: set[str] = set()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = _api(port, "GET", f"/studio/v1/jobs/{job}")
            workers |= set(filter(None, (status.get("worker") or "").split(", ")))
            if status["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.2)
        assert status["state"] == "done", status
        assert len(status["links"]["images"]) == 4
        assert any(network["pc2_ip"] in worker for worker in workers), workers
        copied = tmp_path / "pc2" / "models" / "Stable-diffusion" / "tiny-sd1.safetensors"
        assert copied.read_bytes() == (head_models / "tiny-sd1.safetensors").read_bytes()

        # Ctrl+C on the head and start it again: the queue is back, the second PC rejoins by itself.
        waiting = _api(port, "POST", "/studio/v1/jobs", request | {"seed": 9})["id"]
        head.interrupt()
        head = Pc(head_command, tmp_path / "head-again.log")
        pcs.append(head)
        head.wait_for(rf"cluster node {re.escape(network['pc2_ip'])} joined")
        assert _wait_done(port, waiting)["state"] == "done"
        after = _api(port, "POST", "/studio/v1/jobs", request | {"n_iter": 2, "seed": 11})["id"]
        assert _wait_done(port, after)["state"] == "done"
        assert "Lost the cluster head" in pc2.text()
        jobs = json.dumps(_api(port, "GET", "/studio/v1/jobs"))
        assert job in jobs and waiting in jobs  # from the job store, across the restart
    finally:
        for pc in reversed(pcs):
            pc.kill()
