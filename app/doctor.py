"""``python launch.py doctor``: one report of this PC as SD Studio sees it, to paste into a bug report.

Sections: system, NVIDIA GPUs (``nvidia-smi``), PyTorch (version, CUDA build, whether CUDA works),
attention backend, the memory preset ``auto`` picks and why, ffmpeg, models per folder (with the
family of each checkpoint), free disk, and "what looks wrong", each problem with its fix.
``--json`` prints the same as one JSON object. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.settings import StudioSettings
from installer import disk
from installer.gpu import GpuReport, detect_nvidia
from installer.launch_command import launch_command

SECTIONS = ("system", "gpus", "torch", "attention", "memory_preset", "ffmpeg", "models", "disk", "problems")
TITLES = {
    "system": "System",
    "gpus": "NVIDIA GPUs",
    "torch": "PyTorch",
    "attention": "Attention",
    "memory_preset": "Memory preset",
    "ffmpeg": "ffmpeg",
    "models": "Models",
    "disk": "Free disk",
    "problems": "What looks wrong",
}
MODEL_KINDS = ("checkpoint", "vae", "lora", "controlnet", "upscaler", "embedding", "sadtalker")
LOW_DISK_BYTES = 10 * disk.GB


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mkdir_command(folder: Path) -> str:
    if os.name == "nt":
        return f'New-Item -ItemType Directory -Force "{folder}"'
    return f'mkdir -p "{folder}"'


def system_section() -> dict[str, Any]:
    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "in_venv": sys.prefix != getattr(sys, "base_prefix", sys.prefix),
    }


def torch_section() -> dict[str, Any]:
    """What torch says about itself; torch is imported here (doctor is allowed to be slow)."""
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    cuda_available = bool(torch.cuda.is_available())
    devices = []
    if cuda_available:
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            devices.append({"name": properties.name, "total_memory": int(properties.total_memory)})
    mps = getattr(torch.backends, "mps", None)
    return {
        "installed": True,
        "version": str(torch.__version__),
        "cuda_build": getattr(torch.version, "cuda", None),
        "cuda_available": cuda_available,
        "devices": devices,
        "mps_available": bool(mps is not None and mps.is_available()),
    }


def attention_section(settings: StudioSettings, torch_info: dict[str, Any]) -> dict[str, Any]:
    """The backend ``MemoryOptions.attention`` resolves to (same rule as the engine's ``auto``)."""
    xformers = _version("xformers")
    choice = settings.attention
    cuda = bool(torch_info.get("cuda_available"))
    if choice == "auto":
        backend = "xFormers" if cuda and xformers else "PyTorch SDPA"
        why = (
            "auto: xFormers is installed and CUDA works"
            if backend == "xFormers"
            else "auto: " + ("xFormers is not installed" if cuda else "no CUDA GPU in use") + ", so SDPA"
        )
    elif choice == "xformers" and not (cuda and xformers):
        backend = "PyTorch SDPA"
        why = "xformers asked for, but " + ("it is not installed" if cuda else "it needs a CUDA GPU")
    else:
        backend = {"sdpa": "PyTorch SDPA", "xformers": "xFormers", "slicing": "sliced attention"}.get(
            choice, "as loaded"
        )
        why = f"set to {choice!r}"
    return {"setting": choice, "backend": backend, "why": why, "xformers_version": xformers}


def memory_section(settings: StudioSettings, torch_info: dict[str, Any]) -> dict[str, Any]:
    """What ``auto`` picks per model family, using the engine's own rule (``preset_for_vram``)."""
    from pipelines.generation.memory import VRAM_THRESHOLDS_GIB, preset_for_vram

    devices = torch_info.get("devices") or []
    vram = devices[0]["total_memory"] if devices else None
    picks = {family: preset_for_vram(vram, family) for family in ("sd1", "sdxl")}
    if vram is None:
        why = "no CUDA GPU is usable by PyTorch, so 'auto' runs on the CPU (preset 'cpu')"
    else:
        small, large = VRAM_THRESHOLDS_GIB["small"], VRAM_THRESHOLDS_GIB["large"]
        why = (
            f"{devices[0]['name']} has {vram / 1024**3:.1f} GiB: SD1/SD2 get 'high' from {small[0]} GiB, "
            f"'medvram' from {small[1]} GiB; SDXL 'high' from {large[0]} GiB, 'medvram' from {large[1]} GiB; "
            "less is 'lowvram'"
        )
    return {
        "setting": settings.memory_preset,
        "auto_picks": picks,
        "why": why if settings.memory_preset == "auto" else f"fixed to {settings.memory_preset!r}; {why}",
    }


def ffmpeg_section() -> dict[str, Any]:
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        return {"found": False, "error": str(exc)}
    try:
        first = subprocess.run(
            [exe, "-version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return {"found": False, "path": exe, "error": str(exc)}
    return {"found": True, "path": exe, "version": first[0] if first else "unknown"}


def _model_paths(settings: StudioSettings) -> Any:
    from pipelines.models.registry import ModelPaths

    return ModelPaths(
        models_root=settings.models_dir,
        checkpoints=settings.ckpt_dir,
        vae=settings.vae_dir,
        lora=settings.lora_dir,
        controlnet=settings.controlnet_dir,
        upscalers=settings.esrgan_dir,
        embeddings=settings.embeddings_dir,
    )


def models_section(settings: StudioSettings) -> dict[str, Any]:
    """Each folder, whether it exists, and what the registry finds in it (families for checkpoints)."""
    from pipelines.models.registry import ModelRegistry

    registry = ModelRegistry(_model_paths(settings))
    folders: dict[str, Any] = {}
    for kind in MODEL_KINDS:
        folder = registry.paths.folder(kind)  # type: ignore[arg-type]
        entries = registry.list(kind) if folder.is_dir() else []  # type: ignore[arg-type]
        listed = []
        for entry in entries:
            item: dict[str, Any] = {"name": entry.name, "size_bytes": entry.size_bytes}
            if kind == "checkpoint":
                item["family"] = registry.describe(entry)["family"]
            listed.append(item)
        folders[kind] = {"folder": str(folder), "exists": folder.is_dir(), "models": listed}
    return folders


def disk_section(settings: StudioSettings) -> dict[str, Any]:
    return {
        name: {"path": str(path), "free_bytes": disk.free_bytes(path)}
        for name, path in (("models", settings.models_dir), ("outputs", settings.outputs_dir))
    }


def find_problems(report: dict[str, Any], gpu: GpuReport) -> list[dict[str, str]]:
    """Everything in ``report`` that stops or slows the studio, each with its fix."""
    from app.gpu_check import notice_for
    from installer.torch_builds import reinstall_command

    problems: list[dict[str, str]] = []
    torch_info = report["torch"]
    if not torch_info.get("installed"):
        problems.append(
            {
                "problem": "PyTorch is not installed in this Python.",
                "fix": f"run {reinstall_command(sys.platform)}",
            }
        )
    else:
        notice = notice_for(
            gpu,
            torch_version=torch_info.get("version"),
            torch_cuda=torch_info.get("cuda_build"),
            cuda_available=bool(torch_info.get("cuda_available")),
        )
        if notice:
            problem, _, fix = notice.partition(" Fix: ")
            problems.append({"problem": problem, "fix": fix or "see the problem's text"})
    for kind, info in report["models"].items():
        if not info["exists"]:
            problems.append(
                {
                    "problem": f"The {kind} model folder {info['folder']} does not exist.",
                    "fix": f"create it ({_mkdir_command(Path(info['folder']))}), or point --models-dir at "
                    "your models folder",
                }
            )
    checkpoints = report["models"].get("checkpoint", {})
    if checkpoints.get("exists") and not checkpoints.get("models"):
        from pipelines.models.download import standard_download_command

        problems.append(
            {
                "problem": f"No Stable Diffusion checkpoint in {checkpoints['folder']}.",
                "fix": f"put a .safetensors checkpoint there, or run: {standard_download_command()}",
            }
        )
    if not report["ffmpeg"].get("found"):
        problems.append(
            {
                "problem": "ffmpeg is not available (needed for talking-head videos).",
                "fix": f"run {launch_command()} (it installs imageio-ffmpeg==0.8.1 into .venv)",
            }
        )
    for name, info in report["disk"].items():
        free = info.get("free_bytes")
        if free is not None and free < LOW_DISK_BYTES:
            problems.append(
                {
                    "problem": f"Only {disk.gb(free)} free on the disk holding {name}/ ({info['path']}).",
                    "fix": "free up space: an SDXL checkpoint is about 7 GB, every image a few MB",
                }
            )
    return problems


def collect(settings: StudioSettings, gpu: GpuReport | None = None) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
    gpu = gpu if gpu is not None else detect_nvidia()
    torch_info = torch_section()
    report: dict[str, Any] = {
        "system": system_section(),
        "gpus": gpu.to_dict(),
        "torch": torch_info,
        "attention": attention_section(settings, torch_info),
        "memory_preset": memory_section(settings, torch_info),
        "ffmpeg": ffmpeg_section(),
        "models": models_section(settings),
        "disk": disk_section(settings),
    }
    report["problems"] = find_problems(report, gpu)
    return report


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unknown"
    return disk.gb(num_bytes)


def format_report(report: dict[str, Any]) -> str:
    """The report as text, one ``== Title ==`` block per section."""
    lines: list[str] = []

    def section(key: str) -> None:
        lines.append("")
        lines.append(f"== {TITLES[key]} ==")

    system = report["system"]
    section("system")
    lines.append(f"OS: {system['os']} ({system['machine']})")
    lines.append(
        f"Python: {system['python']} at {system['python_executable']}"
        + (" (venv)" if system["in_venv"] else "")
    )

    gpus = report["gpus"]
    section("gpus")
    if gpus["gpus"]:
        for index, gpu in enumerate(gpus["gpus"]):
            memory = f"{gpu['memory_mib'] / 1024:.1f} GiB" if gpu["memory_mib"] else "VRAM unknown"
            capability = (
                f", compute capability {gpu['compute_capability']}" if gpu["compute_capability"] else ""
            )
            lines.append(f"GPU {index}: {gpu['name']}, {memory}{capability}")
        lines.append(
            f"Driver: {gpus['driver_version'] or 'unknown'} "
            f"(supports CUDA {gpus['cuda_version'] or 'unknown'})"
        )
    elif gpus["error"]:
        lines.append(f"nvidia-smi failed: {gpus['error']}")
    else:
        lines.append("No NVIDIA GPU found (no nvidia-smi).")

    torch_info = report["torch"]
    section("torch")
    if not torch_info.get("installed"):
        lines.append("PyTorch is not installed.")
    else:
        lines.append(f"Version: {torch_info['version']}")
        lines.append(f"CUDA build: {torch_info['cuda_build'] or 'none (CPU-only build)'}")
        lines.append(f"CUDA available: {'yes' if torch_info['cuda_available'] else 'no'}")
        for device in torch_info["devices"]:
            lines.append(f"  sees {device['name']} ({device['total_memory'] / 1024**3:.1f} GiB)")
        if torch_info.get("mps_available"):
            lines.append("Apple MPS available: yes")

    attention = report["attention"]
    section("attention")
    version = (
        f" (xFormers {attention['xformers_version']} installed)" if attention["xformers_version"] else ""
    )
    lines.append(f"{attention['backend']}: {attention['why']}{version}")

    memory = report["memory_preset"]
    section("memory_preset")
    picks = ", ".join(f"{family}: {name}" for family, name in memory["auto_picks"].items())
    lines.append(f"Setting: {memory['setting']}; auto picks {picks}")
    lines.append(f"Why: {memory['why']}")

    ffmpeg = report["ffmpeg"]
    section("ffmpeg")
    lines.append(
        f"{ffmpeg.get('version')} ({ffmpeg.get('path')})"
        if ffmpeg.get("found")
        else f"not found: {ffmpeg.get('error')}"
    )

    section("models")
    for kind, info in report["models"].items():
        if not info["exists"]:
            lines.append(f"{kind}: {info['folder']} (missing)")
            continue
        lines.append(f"{kind}: {info['folder']} ({len(info['models'])} found)")
        for model in info["models"]:
            family = f" [{model['family']}]" if "family" in model else ""
            lines.append(f"  {model['name']}{family} {_size(model['size_bytes'])}")

    section("disk")
    for name, info in report["disk"].items():
        lines.append(f"{name}: {_size(info['free_bytes'])} free ({info['path']})")

    section("problems")
    if not report["problems"]:
        lines.append("Nothing.")
    for number, item in enumerate(report["problems"], start=1):
        lines.append(f"{number}. {item['problem']}")
        lines.append(f"   Fix: {item['fix']}")
    return "\n".join(lines).lstrip("\n") + "\n"


def run_doctor(args: Any, settings: StudioSettings) -> int:
    """CLI entry: print the report (text, or JSON with ``--json``); exit code 0 either way."""
    report = collect(settings)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report), end="")
    return 0
