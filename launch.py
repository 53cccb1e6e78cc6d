#!/usr/bin/env python3
"""Start SD Studio: the web UI by default, or a headless command (generate, batch, models, download).

On first run outside a prepared environment it creates ``.venv``, installs the PyTorch build that
fits this PC's NVIDIA GPU and driver (or the CPU/MPS build without one), then the rest of
requirements.txt, one quiet step at a time with the full log in ``data/logs/``, and restarts itself
inside ``.venv`` (``installer/``). Only the standard library is imported before that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def ensure_environment(argv: list[str]) -> None:
    """Create/repair ``.venv`` and install the right PyTorch for this PC, then the rest
    (``installer/environment.py``; standard library only, so it runs before ``.venv`` exists)."""
    from installer.environment import ensure_environment as prepare

    prepare(ROOT, Path(__file__).resolve(), argv)


def ensure_xformers(argv: list[str]) -> None:
    """``--xformers`` installs the xFormers build matching the installed torch on first use, as A1111
    does; failure is not fatal (the engine falls back to PyTorch SDPA and says so)."""
    from installer.environment import InstallOptions
    from installer.environment import ensure_xformers as install_xformers

    install_xformers(InstallOptions.from_argv(argv))


def ensure_cluster_packages(argv: list[str]) -> None:
    """``--cluster-head``/``--cluster-join``/``--cluster-address`` install Ray (pinned, from
    requirements-cluster.txt) into ``.venv`` on first use, as ``--xformers`` does."""
    import importlib.util

    if not any(flag in argv for flag in ("--cluster-head", "--cluster-join", "--cluster-address")):
        return
    if importlib.util.find_spec("ray") is not None:
        return
    import subprocess

    print("Studio cluster: installing Ray (requirements-cluster.txt) ...", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-cluster.txt")],
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit("Ray could not be installed; see pip's message above (the cluster needs it).")


def print_gpu_notice(command: str | None) -> None:
    """Say at start when an NVIDIA GPU is present but PyTorch cannot use it (with the fix)."""
    if command in ("doctor", "download", "models"):
        return
    from app.gpu_check import gpu_notice

    notice = gpu_notice()
    if notice:
        print(f"SD Studio: WARNING: {notice}", file=sys.stderr, flush=True)


def studio_flags() -> argparse.ArgumentParser:
    """A1111-style flags; valid before or after a sub-command. SUPPRESS keeps absent flags unset."""
    flags = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    g = flags.add_argument_group("studio")
    g.add_argument(
        "--listen", action="store_true", default=s, help="serve on 0.0.0.0 (LAN) instead of 127.0.0.1"
    )
    g.add_argument("--port", type=int, default=s, help="HTTP port (default 7860)")
    g.add_argument("--share", action="store_true", default=s, help="gradio share link (off by default)")
    g.add_argument("--api", action="store_true", default=s, help="also serve the REST API")
    g.add_argument("--nowebui", action="store_true", default=s, help="serve the API only")
    g.add_argument("--auth", default=s, help="user:pass[,user2:pass2] required for the UI")
    g.add_argument("--auth-file", type=Path, default=s, help="file of user:pass lines")
    g.add_argument(
        "--api-auth", default=s, help="user:pass[,user2:pass2] for the REST API (HTTP Basic; default: --auth)"
    )
    g.add_argument("--max-upload-mb", type=float, default=s, help="largest request body in MB (default 50)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=s,
        help="memory budget: most pixels an output or intermediate image may have (default: from RAM/VRAM)",
    )
    g.add_argument(
        "--share-outputs",
        action="store_true",
        default=s,
        help="with --api-auth, every user may fetch every output file (default: only their own)",
    )
    g.add_argument(
        "--max-queued-jobs", type=int, default=s, help="waiting jobs beyond this get HTTP 429 (default 100)"
    )
    g.add_argument("--cli", action="store_true", default=s, help="never start the web UI (headless)")
    g.add_argument("--skip-venv", action="store_true", default=s, help="use the current Python as is")
    i = flags.add_argument_group("install")
    i.add_argument(
        "--torch-index-url",
        default=s,
        metavar="URL",
        help="install PyTorch from this wheel index (default: the CUDA build chosen for your NVIDIA driver; "
        "also SDSTUDIO_TORCH_INDEX_URL)",
    )
    i.add_argument(
        "--reinstall-torch", action="store_true", default=s, help="choose and install PyTorch again"
    )
    i.add_argument("--install-only", action="store_true", default=s, help="install .venv and exit")
    g.add_argument("--data-dir", type=Path, default=s, help="job store, caches, config.json (default data/)")
    g.add_argument("--outputs-dir", type=Path, default=s, help="output folder (default outputs/)")
    g.add_argument("--models-dir", type=Path, default=s, help="model folders root (default models/)")
    g.add_argument(
        "--ckpt-dir", type=Path, default=s, help="checkpoint folder (default models/Stable-diffusion)"
    )
    g.add_argument("--vae-dir", type=Path, default=s)
    g.add_argument("--lora-dir", type=Path, default=s)
    g.add_argument("--controlnet-dir", type=Path, default=s)
    g.add_argument("--esrgan-models-path", type=Path, default=s)
    g.add_argument("--embeddings-dir", type=Path, default=s)
    g.add_argument("--ckpt", default=s, help="default checkpoint name")
    g.add_argument(
        "--preload-model", action="store_true", default=s, help="load the default model at startup"
    )
    g.add_argument(
        "--checkpoints-in-ram", type=int, default=s, help="loaded checkpoints kept in RAM (default 2)"
    )
    m = flags.add_argument_group("memory and speed")
    m.add_argument("--medvram", action="store_true", default=s, help="model CPU offload (6-8 GB GPUs)")
    m.add_argument(
        "--lowvram", action="store_true", default=s, help="block-level group offload (2-4 GB GPUs)"
    )
    m.add_argument(
        "--lowvram-sequential", action="store_true", default=s, help="A1111's sequential CPU offload"
    )
    m.add_argument(
        "--memory-preset",
        choices=["auto", "high", "medvram", "lowvram", "lowvram-sequential", "cpu"],
        default=s,
    )
    m.add_argument(
        "--fp8-unet", action="store_true", default=s, help="UNet weights stored in float8 (6-8 GB GPUs)"
    )
    m.add_argument("--no-half", action="store_true", default=s, help="run in float32")
    m.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], default=s, help="compute dtype")
    m.add_argument("--no-half-vae", action="store_true", default=s, help="keep the VAE in float32")
    m.add_argument(
        "--xformers", action="store_true", default=s, help="xFormers attention (pip install xformers)"
    )
    m.add_argument("--opt-sdp-attention", action="store_true", default=s, help="PyTorch SDPA attention")
    m.add_argument("--opt-channelslast", action="store_true", default=s, help="channels-last memory format")
    m.add_argument("--compile", action="store_true", default=s, help="torch.compile the UNet")
    m.add_argument("--no-tf32", action="store_true", default=s, help="disable TF32 matmuls")
    w = flags.add_argument_group("workers (one process per GPU runs the jobs)")
    w.add_argument("--device-id", default=s, help="run jobs on this one device: 0, cuda:1, cpu, mps")
    w.add_argument(
        "--device-ids", default=s, help="comma-separated devices, one worker each (e.g. 0,1 or cpu,cpu)"
    )
    w.add_argument(
        "--in-process-workers", action="store_true", default=s, help="run jobs inside the studio process"
    )
    w.add_argument(
        "--max-job-attempts", type=int, default=s, help="runs of a job that crash its worker before it fails"
    )
    c = flags.add_argument_group("studio cluster (Ray; see README 'Running a studio cluster')")
    c.add_argument(
        "--cluster-head",
        action="store_true",
        default=s,
        help="this PC runs the studio and the cluster's head",
    )
    c.add_argument(
        "--cluster-join", metavar="HEAD:PORT", default=s, help="run this PC as a node of that cluster"
    )
    c.add_argument("--cluster-token", default=s, help="the token the head printed (else data/cluster_token)")
    c.add_argument(
        "--cluster-address",
        metavar="HEAD:PORT",
        default=s,
        help="use the workers of a Ray cluster started by hand",
    )
    c.add_argument(
        "--cluster-shared-models",
        action="store_true",
        default=s,
        help="every node reads --models-dir (shared)",
    )
    c.add_argument("--gpu-share", type=int, default=s, help="workers per GPU on each node (default 1)")
    c.add_argument(
        "--split-talking-head",
        type=float,
        default=s,
        metavar="SECONDS",
        help="render talking heads with this much speech or more on several workers at once "
        "(default 8; 0: all; -1: never)",
    )
    return flags


def settings_overrides(args: argparse.Namespace) -> dict[str, object]:
    given = vars(args)
    mapping = {
        "listen": "listen",
        "port": "port",
        "share": "share",
        "api": "api",
        "nowebui": "nowebui",
        "auth": "auth",
        "auth_file": "auth_file",
        "api_auth": "api_auth",
        "max_upload_mb": "max_upload_mb",
        "max_pixels": "max_pixels",
        "share_outputs": "share_outputs",
        "max_queued_jobs": "max_queued_jobs",
        "data_dir": "data_dir",
        "outputs_dir": "outputs_dir",
        "models_dir": "models_dir",
        "ckpt_dir": "ckpt_dir",
        "vae_dir": "vae_dir",
        "lora_dir": "lora_dir",
        "controlnet_dir": "controlnet_dir",
        "esrgan_models_path": "esrgan_dir",
        "embeddings_dir": "embeddings_dir",
        "ckpt": "default_checkpoint",
        "preload_model": "preload_model",
        "checkpoints_in_ram": "checkpoints_in_ram",
        "memory_preset": "memory_preset",
        "no_half": "no_half",
        "precision": "precision",
        "no_half_vae": "no_half_vae",
        "opt_channelslast": "channels_last",
        "compile": "compile",
        "fp8_unet": "fp8_unet",
    }
    overrides: dict[str, object] = {mapping[k]: v for k, v in given.items() if k in mapping}
    if given.get("medvram"):
        overrides["memory_preset"] = "medvram"
    if given.get("lowvram"):
        overrides["memory_preset"] = "lowvram"
    if given.get("lowvram_sequential"):
        overrides["memory_preset"] = "lowvram-sequential"
    if given.get("xformers"):
        overrides["attention"] = "xformers"
    elif given.get("opt_sdp_attention"):
        overrides["attention"] = "sdpa"
    if given.get("no_tf32"):
        overrides["tf32"] = False
    devices = given.get("device_ids") or given.get("device_id")
    if devices:
        overrides["device_ids"] = [_device_name(item) for item in str(devices).split(",") if item.strip()]
    if given.get("in_process_workers"):
        overrides["in_process_workers"] = True
    if given.get("max_job_attempts"):
        overrides["max_job_attempts"] = given["max_job_attempts"]
    for name in ("cluster_address", "cluster_shared_models", "gpu_share"):
        if given.get(name):
            overrides[name] = given[name]
    if given.get("split_talking_head") is not None:
        overrides["talking_head_split_seconds"] = given["split_talking_head"]
    return overrides


def _device_name(text: str) -> str:
    """``0`` -> ``cuda:0`` (A1111's ``--device-id`` takes a CUDA index); names pass through."""
    text = text.strip()
    return f"cuda:{text}" if text.isdigit() else text


def parse_args(argv: list[str]) -> argparse.Namespace:
    from app.cli import build_parser

    flags = studio_flags()
    parser = argparse.ArgumentParser(
        prog="launch.py", parents=[flags], description="SD Studio: web UI (default) or a headless command."
    )
    build_parser(parser, common=[studio_flags()])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from installer.launch_command import remember_launch_command

    remember_launch_command()  # before the restart into .venv, whose interpreter the user never typed
    if not any(a in ("-h", "--help") for a in argv):
        ensure_environment(argv)
        ensure_xformers(argv)
        ensure_cluster_packages(argv)
    sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    from app.settings import load_settings

    settings = load_settings(settings_overrides(args))
    if settings.max_pixels is not None:
        from contract.budget import set_max_pixels

        set_max_pixels(settings.max_pixels)  # checked by every request model, in workers too
    if args.command or not getattr(args, "cli", False):
        print_gpu_notice(args.command)
    if args.command:
        from app.cli import COMMANDS

        return COMMANDS[args.command](args, settings)
    if getattr(args, "cli", False):
        print("--cli: no web UI. Commands: generate, batch, models, download (see --help).")
        return 0
    if getattr(args, "cluster_join", None):
        from app.cluster.launcher import join

        return join(settings, args.cluster_join, getattr(args, "cluster_token", None))
    if getattr(args, "cluster_head", None):
        from app.cluster.launcher import start_head, stop_node

        settings = settings.model_copy(update={"cluster_address": start_head(settings)})
        try:
            return _serve(settings)
        finally:
            stop_node()
    return _serve(settings)


def _serve(settings: object) -> int:
    from app.server import serve

    return serve(settings)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
