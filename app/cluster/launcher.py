"""The cluster's Ray processes: ``--cluster-head`` on the studio PC, ``--cluster-join`` on the others.

Ray listens on all interfaces; the ports are fixed (:data:`PORTS`, README "Running a studio cluster")
so a firewall can admit exactly them from the LAN. The dashboard is not started. The head runs with
one-second health checks (three misses: a switched-off PC is noticed in ~3 s instead of Ray's ~13 s).
Every node declares ``sdstudio_worker`` slots (its GPUs times ``--gpu-share``, or one for the CPU)
and a joining PC's Ray processes carry its own models and data folders (``app.cluster.actor``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.cluster.actor import NODE_DATA_ENV, NODE_MODELS_ENV, SHARED_MODELS_ENV
from app.cluster.handle import WORKER_RESOURCE
from app.cluster.security import auth_environment, check_token, head_token, joining_token

if TYPE_CHECKING:
    from app.settings import StudioSettings

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
PORTS = {
    "gcs": 6379,  # the head's address: host:6379
    "node_manager": 6380,
    "object_manager": 6381,
    "dashboard_agent_grpc": 6382,
    "runtime_env_agent": 6383,
    "metrics_export": 6384,
    "dashboard_agent_listen": 6385,
    "min_worker": 10002,
    "max_worker": 10100,
}
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def ray_executable() -> str:
    """The ``ray`` command of this Python's environment."""
    beside = Path(sys.executable).with_name("ray.exe" if os.name == "nt" else "ray")
    return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")


def worker_slots(gpu_share: int) -> tuple[int, int]:
    """``(slots, gpus)`` this PC declares: GPUs x ``gpu_share`` worker slots, else one CPU slot."""
    from app.workers.pool import detect_devices

    devices = detect_devices()
    gpus = sum(1 for device in devices if device.startswith("cuda"))
    return (gpus * gpu_share, gpus) if gpus else (1, 0)


def node_environment(token: str, *, shared_models: bool, own: StudioSettings | None = None) -> dict[str, str]:
    """The environment of a node's Ray processes: the token, this checkout on the import path and,
    for a joining PC (``own``: its settings), its own models and data folders."""
    env = dict(os.environ)
    env.update(auth_environment(token))
    for key in (NODE_MODELS_ENV, NODE_DATA_ENV):
        env.pop(key, None)  # the head's own node uses the head's settings as they are
    if own is not None:
        env[NODE_MODELS_ENV] = str(own.models_dir)
        env[NODE_DATA_ENV] = str(own.data_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    # Ray starts its worker processes at nice 15: beside an artist's busy desktop they would get
    # almost no CPU (data loading, encoding, the CPU fallback). Studio workers run at normal priority.
    env.setdefault("RAY_worker_niceness", "0")
    if shared_models:
        env[SHARED_MODELS_ENV] = "1"
    return env


def start_command(
    *, head: bool, address: str | None, slots: int, gpus: int, block: bool = False
) -> list[str]:
    command = [ray_executable(), "start", "--disable-usage-stats"]
    if head:  # Ray refuses --include-dashboard on a joining node ("only ... with --head")
        command += [
            "--head",
            "--include-dashboard=false",
            f"--port={PORTS['gcs']}",
            f"--system-config={json.dumps(HEALTH_CHECKS)}",
        ]
    else:
        command += [f"--address={address}"]
    command += [
        f"--node-manager-port={PORTS['node_manager']}",
        f"--object-manager-port={PORTS['object_manager']}",
        f"--dashboard-agent-grpc-port={PORTS['dashboard_agent_grpc']}",
        f"--dashboard-agent-listen-port={PORTS['dashboard_agent_listen']}",
        f"--runtime-env-agent-port={PORTS['runtime_env_agent']}",
        f"--metrics-export-port={PORTS['metrics_export']}",
        f"--min-worker-port={PORTS['min_worker']}",
        f"--max-worker-port={PORTS['max_worker']}",
        f"--num-gpus={gpus}",
        f"--resources={json.dumps({WORKER_RESOURCE: slots})}",
    ]
    if block:
        command.append("--block")
    return command


def lan_address() -> str:
    """This PC's address on the LAN (the one a route to the outside would use), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def start_head(settings: StudioSettings) -> str:
    """Start the Ray head on this PC (its GPUs serve jobs too) and return the address to connect to;
    prints the command the other PCs run to join."""
    token = head_token(settings.data_dir)
    slots, gpus = worker_slots(settings.gpu_share)
    env = node_environment(token, shared_models=settings.cluster_shared_models)
    done = subprocess.run(
        start_command(head=True, address=None, slots=slots, gpus=gpus), env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"--cluster-head: Ray's head did not start (exit code {done.returncode}). If a studio cluster is "
            "already running on this PC, stop it with `.venv/bin/ray stop`; port "
            f"{PORTS['gcs']} must be free."
        )
    from installer.launch_command import launch_command

    address = f"{lan_address()}:{PORTS['gcs']}"
    os.environ.update(auth_environment(token))
    print(
        "\nStudio cluster head started. On each other PC (in its SD Studio folder) run:\n\n"
        f"    {launch_command('--cluster-join', address, '--cluster-token', token)}\n\n"
        f"(or copy {settings.data_dir / 'cluster_token'} into that PC's data/ folder and leave out "
        "--cluster-token). Keep the token secret: it admits a PC to run code in the cluster.\n",
        flush=True,
    )
    return address


def stop_node() -> None:
    subprocess.run([ray_executable(), "stop"], check=False, capture_output=True)


def join(settings: StudioSettings, address: str, token: str | None) -> int:
    """Run this PC as a cluster node until Ctrl+C (its workers take jobs from the head's queue)."""
    from app.cluster.security import ClusterAuthError

    token = joining_token(settings.data_dir, token)
    try:
        check_token(address, token)
    except ClusterAuthError as exc:
        print(f"--cluster-join: {exc}", file=sys.stderr)
        return 2
    assert token is not None
    slots, gpus = worker_slots(settings.gpu_share)
    env = node_environment(token, shared_models=settings.cluster_shared_models, own=settings)
    print(
        f"Joining the studio cluster at {address} with {slots} worker slot(s); Ctrl+C leaves it.", flush=True
    )
    command = start_command(head=False, address=address, slots=slots, gpus=gpus, block=True)
    try:
        while True:
            code = subprocess.run(command, env=env, check=False).returncode
            # The node ends when it loses the head (a head restart, the network): join again.
            print(
                f"Lost the cluster head at {address} (exit code {code}); joining again in 10 s.", flush=True
            )
            stop_node()
            time.sleep(10)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_node()
