"""The commands ``--cluster-head``/``--cluster-join`` run (no Ray process is started here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cluster.actor import NODE_DATA_ENV, NODE_MODELS_ENV, node_settings
from app.cluster.launcher import PORTS, node_environment, start_command
from app.settings import StudioSettings


def test_head_and_join_commands_use_the_documented_ports_and_slots() -> None:
    head = start_command(head=True, address=None, slots=2, gpus=1)
    assert "--head" in head and f"--port={PORTS['gcs']}" in head
    assert "--include-dashboard=false" in head
    system = json.loads(next(arg for arg in head if arg.startswith("--system-config="))[16:])
    assert system["health_check_period_ms"] == 1000 and system["health_check_failure_threshold"] == 3
    join = start_command(head=False, address="10.0.0.5:6379", slots=1, gpus=0, block=True)
    assert "--address=10.0.0.5:6379" in join and "--block" in join and "--head" not in join
    assert not [arg for arg in join if arg.startswith("--include-dashboard")]  # refused off the head
    for command in (head, join):
        resources = json.loads(next(a for a in command if a.startswith("--resources="))[12:])
        assert resources["sdstudio_worker"] >= 1
        assert f"--min-worker-port={PORTS['min_worker']}" in command
        assert f"--max-worker-port={PORTS['max_worker']}" in command
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"{PORTS['min_worker']}-{PORTS['max_worker']}" in readme and str(PORTS["gcs"]) in readme


def test_a_joining_pc_keeps_its_own_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head = StudioSettings(models_dir=tmp_path / "head-models", data_dir=tmp_path / "head-data")
    own = StudioSettings(models_dir=tmp_path / "pc-models", data_dir=tmp_path / "pc-data")
    env = node_environment("t" * 64, shared_models=False, own=own)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "t" * 64
    assert env["RAY_worker_niceness"] == "0"  # not Ray's nice 15: a busy desktop would starve them
    for key in (NODE_MODELS_ENV, NODE_DATA_ENV):
        monkeypatch.setenv(key, env[key])
    seen = node_settings(head.model_dump_json())
    assert seen.models_dir == own.models_dir and seen.data_dir == own.data_dir
    shared = node_settings(head.model_copy(update={"cluster_shared_models": True}).model_dump_json())
    assert shared.models_dir == head.models_dir  # one shared folder for the studio
    assert NODE_MODELS_ENV not in node_environment("t", shared_models=False)  # the head's own node
