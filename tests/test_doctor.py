"""``launch.py doctor``: every section, ``--json``, and "what looks wrong" with a missing model folder
and a CPU-only PyTorch on a PC whose nvidia-smi reports an RTX card (both faked: a fake nvidia-smi on
PATH and a stand-in ``torch`` package on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.doctor import SECTIONS, TITLES, find_problems, format_report
from installer.gpu import GpuReport, NvidiaGpu
from tests import nvidia_smi_outputs as smi

ROOT = Path(__file__).resolve().parent.parent

FAKE_TORCH = """
__version__ = "2.14.1+cpu"


class version:
    cuda = None


class cuda:
    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0


class backends:
    class mps:
        @staticmethod
        def is_available():
            return False
"""


@pytest.fixture(scope="module")
def faked_pc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("doctor")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(smi.fake_nvidia_smi_script(smi.RTX_4090_LINUX))
    script.chmod(0o755)
    fake_torch = base / "fake_torch" / "torch"
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text(FAKE_TORCH)
    models = base / "models"
    for folder in ("Stable-diffusion", "VAE", "Lora", "ESRGAN", "SadTalker"):
        (models / folder).mkdir(parents=True)
    (base / "embeddings").mkdir()
    # models/ControlNet is missing on purpose.
    return {"base": base, "bin": bin_dir, "torch": fake_torch.parent, "models": models}


def run_doctor(faked_pc: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{faked_pc['bin']}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(faked_pc["torch"]),
        "SDSTUDIO_SKIP_VENV": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "doctor",
            "--models-dir",
            str(faked_pc["models"]),
            "--data-dir",
            str(faked_pc["base"] / "data"),
            "--outputs-dir",
            str(faked_pc["base"] / "outputs"),
            *args,
        ],
        cwd=faked_pc["base"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_doctor_prints_every_section_and_what_looks_wrong(faked_pc: dict[str, Path]) -> None:
    result = run_doctor(faked_pc)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in SECTIONS:
        assert f"== {TITLES[key]} ==" in out
    assert "GPU 0: NVIDIA GeForce RTX 4090, 24.0 GiB" in out
    assert "Driver: 572.16 (supports CUDA 12.8)" in out
    assert "Version: 2.14.1+cpu" in out and "CUDA build: none (CPU-only build)" in out
    assert "CUDA available: no" in out
    assert "PyTorch SDPA" in out
    assert "auto picks sd1: cpu, sdxl: cpu" in out
    wrong = out.split("== What looks wrong ==", 1)[1]
    assert "NVIDIA GeForce RTX 4090 found, but PyTorch 2.14.1+cpu is a CPU-only build" in wrong
    assert f"{sys.executable} {ROOT / 'launch.py'} --reinstall-torch" in wrong  # as this test ran it
    assert f"The controlnet model folder {faked_pc['models'] / 'ControlNet'} does not exist." in wrong
    assert "No Stable Diffusion checkpoint" in wrong


def test_doctor_json_parses_with_every_section(faked_pc: dict[str, Path]) -> None:
    result = run_doctor(faked_pc, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(SECTIONS) <= set(report)
    assert report["gpus"]["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert report["torch"]["cuda_build"] is None and report["torch"]["cuda_available"] is False
    assert report["models"]["controlnet"]["exists"] is False
    problems = " ".join(item["problem"] for item in report["problems"])
    assert "CPU-only build" in problems and "ControlNet" in problems
    assert all(item["fix"] for item in report["problems"])


def _report(torch_info: dict[str, object]) -> dict[str, object]:
    return {
        "system": {"os": "Windows-11", "machine": "AMD64", "python": "3.12.7", "python_executable": "x",
                   "in_venv": True},
        "gpus": {"gpus": [], "driver_version": None, "cuda_version": None, "nvidia_smi": None, "error": None},
        "torch": torch_info,
        "attention": {"setting": "auto", "backend": "PyTorch SDPA", "why": "auto", "xformers_version": None},
        "memory_preset": {"setting": "auto", "auto_picks": {"sd1": "high", "sdxl": "high"}, "why": "24 GiB"},
        "ffmpeg": {"found": True, "path": "ffmpeg", "version": "ffmpeg version 7"},
        "models": {"checkpoint": {"folder": "models/Stable-diffusion", "exists": True,
                                  "models": [{"name": "a", "size_bytes": 2, "family": "SD1.x"}]}},
        "disk": {"models": {"path": "models", "free_bytes": 500 * 10**9}},
    }  # fmt: skip


def test_cuda_build_newer_than_the_driver_is_named_with_its_fix() -> None:
    gpu = GpuReport(
        gpus=(NvidiaGpu("NVIDIA GeForce RTX 3090", 24576, (8, 6)),),
        driver_version="550.120",
        cuda_version=(12, 4),
    )
    report = _report(
        {"installed": True, "version": "2.14.1", "cuda_build": "13.0", "cuda_available": False, "devices": []}
    )
    problems = find_problems(report, gpu)
    assert len(problems) == 1
    assert "built for CUDA 13.0" in problems[0]["problem"]
    assert "--reinstall-torch" in problems[0]["fix"]


def test_healthy_report_says_nothing_is_wrong() -> None:
    report = _report(
        {
            "installed": True,
            "version": "2.14.1+cu128",
            "cuda_build": "12.8",
            "cuda_available": True,
            "devices": [],
        }
    )
    report["problems"] = find_problems(report, GpuReport())
    assert report["problems"] == []
    text = format_report(report)
    assert text.rstrip().endswith("== What looks wrong ==\nNothing.")
    assert "a [SD1.x]" in text


def test_ui_header_shows_the_gpu_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradio as gr

    from app import gpu_check
    from app.ui import _build_gpu_notice

    monkeypatch.setattr(gpu_check, "gpu_notice", lambda: "NVIDIA GeForce RTX 4090 found, but ... Fix: x")
    with gr.Blocks() as demo:
        _build_gpu_notice()
    notices = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "gpu_notice"]
    assert len(notices) == 1 and "RTX 4090" in notices[0].value
    monkeypatch.setattr(gpu_check, "gpu_notice", lambda: None)
    with gr.Blocks() as healthy:
        _build_gpu_notice()
    assert not [block for block in healthy.blocks.values() if getattr(block, "elem_id", None) == "gpu_notice"]
