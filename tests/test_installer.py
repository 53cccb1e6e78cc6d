"""The GPU-aware install: nvidia-smi parsing, the PyTorch build choice per card/driver/platform, the
"GPU present but torch cannot use it" message, disk and venv checks, quiet pip steps, and launch.py's
install path in a fresh copy of the repo (dry run, and a real pip run against a local wheel index)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from installer import disk
from installer.environment import (
    InstallOptions,
    _install_torch,
    long_path_warning,
    plan_torch,
    read_pins,
    torch_install_command,
    venv_problem,
    venv_python,
    xformers_command,
)
from installer.gpu import GpuReport, NvidiaGpu, detect_nvidia, parse_banner, parse_query_csv
from installer.pip_steps import StepFailedError, StepRunner
from installer.torch_builds import CUDA_BUILDS, choose_torch_build, gpu_unusable_message, reinstall_command
from tests import nvidia_smi_outputs as smi

ROOT = Path(__file__).resolve().parent.parent
PINS = {"torch": "2.14.1", "torchvision": "0.29.1"}


def fake_runner(case: smi.SmiCase):
    def run(command):
        if any(arg.startswith("--query-gpu") for arg in command):
            return subprocess.CompletedProcess(command, 0, case.query, "")
        return subprocess.CompletedProcess(command, 0, case.banner, "")

    return run


def report_for(case: smi.SmiCase) -> GpuReport:
    return detect_nvidia(fake_runner(case), which=lambda name: "/usr/bin/nvidia-smi")


# ---------------------------------------------------------------------------------------------
# nvidia-smi parsing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "name", "memory", "driver", "cuda"),
    [
        (smi.RTX_2060_WINDOWS, "NVIDIA GeForce RTX 2060", 6144, "537.58", (12, 2)),
        (smi.RTX_3090_LINUX, "NVIDIA GeForce RTX 3090", 24576, "550.120", (12, 4)),
        (smi.RTX_4090_WINDOWS, "NVIDIA GeForce RTX 4090", 24564, "572.16", (12, 8)),
        (smi.RTX_5090_LINUX_570, "NVIDIA GeForce RTX 5090", 32607, "570.86.15", (12, 8)),
        (smi.RTX_4060_LAPTOP_WINDOWS, "NVIDIA GeForce RTX 4060 Laptop GPU", 8188, "566.36", (12, 7)),
        (smi.GTX_1660_OLD_DRIVER, "NVIDIA GeForce GTX 1660 SUPER", 5926, "470.182.03", (11, 4)),
    ],
)
def test_detect_reads_query_and_banner(case, name, memory, driver, cuda) -> None:
    report = report_for(case)
    assert [gpu.name for gpu in report.gpus] == [name]
    assert report.gpus[0].memory_mib == memory
    assert report.driver_version == driver
    assert report.cuda_version == cuda
    assert report.error is None


def test_banner_alone_gives_driver_cuda_and_memory() -> None:
    gpus, driver, cuda = parse_banner(smi.RTX_5090_LINUX_580.banner)
    assert driver == "580.65.06" and cuda == (13, 0)
    assert gpus[0].name == "NVIDIA GeForce RTX 5090" and gpus[0].memory_mib == 32607
    assert gpus[0].is_blackwell  # by name: the banner has no compute capability


def test_query_csv_with_units_header_and_several_gpus() -> None:
    text = "name, memory.total [MiB], driver_version\nNVIDIA GeForce RTX 3090, 24576 MiB, 550.120\n"
    text += "NVIDIA GeForce RTX 3060, 12288 MiB, 550.120\n"
    gpus, driver = parse_query_csv(text)
    assert [gpu.memory_mib for gpu in gpus] == [24576, 12288] and driver == "550.120"


def test_old_driver_without_compute_cap_is_asked_again_without_it() -> None:
    calls: list[list[str]] = []

    def run(command):
        calls.append(list(command))
        if any("compute_cap" in arg for arg in command):
            return subprocess.CompletedProcess(
                command, 2, 'Field "compute_cap" is not a valid field to query.', ""
            )
        return fake_runner(smi.GTX_1660_OLD_DRIVER)(command)

    report = detect_nvidia(run, which=lambda name: "nvidia-smi")
    assert report.gpus[0].name == "NVIDIA GeForce GTX 1660 SUPER"
    assert len(calls) == 3


def test_no_nvidia_smi_and_failing_driver() -> None:
    assert (
        detect_nvidia(fake_runner(smi.RTX_4090_LINUX), which=lambda name: None, is_windows=False)
        == GpuReport()
    )

    def failing(command):
        return subprocess.CompletedProcess(command, 9, smi.DRIVER_NOT_LOADED, "")

    report = detect_nvidia(failing, which=lambda name: "nvidia-smi")
    assert not report.has_gpu
    assert "couldn't communicate with the NVIDIA driver" in (report.error or "")


# ---------------------------------------------------------------------------------------------
# the build choice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "system", "expected"),
    [
        (smi.RTX_2060_WINDOWS, "win32", "cu126"),  # 537 < 560.76: CUDA 12 minor-version compatibility
        (smi.RTX_3090_LINUX, "linux", "cu126"),  # 550 < 560.28: same
        (smi.RTX_4090_WINDOWS, "win32", "cu128"),
        (smi.RTX_4090_LINUX, "linux", "cu128"),
        (smi.RTX_5090_LINUX_570, "linux", "cu128"),
        (smi.RTX_5090_LINUX_580, "linux", "cu130"),
        (smi.RTX_4060_LAPTOP_WINDOWS, "win32", "cu126"),
        (smi.RTX_4070_LINUX, "linux", "cu126"),
    ],
)
def test_newest_build_the_driver_supports(case, system, expected) -> None:
    plan = choose_torch_build(report_for(case), system)
    assert plan.kind == "cuda"
    assert plan.build is not None and plan.build.tag == expected
    assert plan.index_url == f"https://download.pytorch.org/whl/{expected}"
    assert plan.requirement("torch", "2.14.1") == f"torch==2.14.1+{expected}"


def test_minor_version_compatibility_is_said_with_the_driver_to_install() -> None:
    plan = choose_torch_build(report_for(smi.RTX_2060_WINDOWS), "win32")
    assert plan.notes and "537.58" in plan.notes[0] and "560.76" in plan.notes[0]
    assert not choose_torch_build(report_for(smi.RTX_4090_WINDOWS), "win32").notes


def test_blackwell_never_gets_a_build_older_than_cuda_12_8() -> None:
    blackwell = GpuReport(
        gpus=(NvidiaGpu("NVIDIA GeForce RTX 5080", 16303, (12, 0)),), driver_version="566.36"
    )
    plan = choose_torch_build(blackwell, "win32")
    assert plan.build is not None and plan.build.cuda >= (12, 8)


@pytest.mark.parametrize("case", [smi.GTX_1660_OLD_DRIVER, smi.RTX_2060_OLD_DRIVER])
def test_too_old_driver_installs_the_standard_build_and_names_the_driver(case) -> None:
    plan = choose_torch_build(report_for(case), "linux")
    assert plan.kind == "default" and plan.index_url is None
    assert "470.182.03 is too old" in plan.notes[0]
    assert "560.28.03" in plan.notes[0]  # the oldest build in the table that drives these cards
    assert "python3 launch.py --reinstall-torch" in plan.notes[0]


def test_macos_and_no_gpu_get_the_plain_build() -> None:
    mac = choose_torch_build(GpuReport(), "darwin")
    assert mac.kind == "default" and mac.index_url is None and "MPS" in mac.summary
    for system in ("linux", "win32"):
        plan = choose_torch_build(GpuReport(), system)
        assert plan.kind == "default" and plan.index_url is None and "no NVIDIA GPU" in plan.summary
    assert plan.requirement("torch", "2.14.1") == "torch==2.14.1"


def test_override_flag_and_env_var_win() -> None:
    url = "https://download.pytorch.org/whl/cu126"
    plan = choose_torch_build(report_for(smi.RTX_5090_LINUX_580), "linux", override=url)
    assert plan.kind == "override" and plan.index_url == url
    assert InstallOptions.from_argv(["--torch-index-url", url], {}).index_url == url
    assert InstallOptions.from_argv([f"--torch-index-url={url}"], {}).index_url == url
    assert InstallOptions.from_argv([], {"SDSTUDIO_TORCH_INDEX_URL": url}).index_url == url
    flag_wins = InstallOptions.from_argv(["--torch-index-url", "x"], {"SDSTUDIO_TORCH_INDEX_URL": url})
    assert flag_wins.index_url == "x"


def test_table_is_newest_first_with_both_platforms() -> None:
    assert [build.cuda for build in CUDA_BUILDS] == sorted((b.cuda for b in CUDA_BUILDS), reverse=True)
    assert all(build.min_driver("linux") and build.min_driver("win32") for build in CUDA_BUILDS)


# ---------------------------------------------------------------------------------------------
# "GPU present but torch cannot use it"
# ---------------------------------------------------------------------------------------------
def test_cpu_only_torch_with_a_gpu_says_so_with_the_fix() -> None:
    report = report_for(smi.RTX_4090_WINDOWS)
    message = gpu_unusable_message(
        report, "win32", torch_version="2.14.1+cpu", torch_cuda=None, cuda_available=False
    )
    assert message is not None
    assert "NVIDIA GeForce RTX 4090 found" in message and "CPU-only build" in message
    assert r".\launch.bat --reinstall-torch" in message and "CUDA 12.8" in message


def test_cuda_build_newer_than_the_driver() -> None:
    message = gpu_unusable_message(
        report_for(smi.RTX_4090_LINUX),
        "linux",
        torch_version="2.14.1",
        torch_cuda="13.0",
        cuda_available=False,
    )
    assert message is not None
    assert "built for CUDA 13.0" in message and "supports CUDA up to 12.8" in message
    assert "python3 launch.py --reinstall-torch" in message and "580.65.06" in message


def test_nothing_to_say_when_cuda_works_or_there_is_no_gpu() -> None:
    kwargs = {"torch_version": "2.14.1+cu128", "torch_cuda": "12.8"}
    assert (
        gpu_unusable_message(report_for(smi.RTX_4090_LINUX), "linux", cuda_available=True, **kwargs) is None
    )
    assert gpu_unusable_message(GpuReport(), "linux", cuda_available=False, **kwargs) is None


def test_gpu_notice_fakes_cuda_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from app import gpu_check

    fake_torch = SimpleNamespace(
        __version__="2.14.1+cpu",
        version=SimpleNamespace(cuda=None),
        cuda=SimpleNamespace(is_available=lambda: False),
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(gpu_check, "detect_nvidia", lambda: report_for(smi.RTX_3090_LINUX))
    monkeypatch.setattr(gpu_check.sys, "platform", "linux")
    gpu_check.gpu_notice.cache_clear()
    try:
        notice = gpu_check.gpu_notice()
    finally:
        gpu_check.gpu_notice.cache_clear()
    assert notice is not None and "NVIDIA GeForce RTX 3090" in notice and "CPU-only" in notice
    assert reinstall_command("linux") in notice


# ---------------------------------------------------------------------------------------------
# what to reinstall, pip commands
# ---------------------------------------------------------------------------------------------
def test_installed_cuda_build_is_kept() -> None:
    installed = {"torch": "2.14.1+cu126", "torchvision": "0.29.1+cu126", "torch_cuda": "12.6"}

    def no_detection() -> GpuReport:
        raise AssertionError("a kept CUDA build needs no GPU detection")

    plan, reinstall = plan_torch(
        InstallOptions(), installed, PINS, record={}, detect=no_detection, system="linux"
    )
    assert plan.kind == "keep" and not reinstall


def test_cpu_build_with_a_gpu_is_replaced_and_reinstall_flag_rechooses() -> None:
    cpu = {"torch": "2.14.1+cpu", "torch_cuda": None}
    plan, reinstall = plan_torch(
        InstallOptions(),
        cpu,
        PINS,
        record={},
        detect=lambda: report_for(smi.RTX_4090_WINDOWS),
        system="win32",
    )
    assert plan.build is not None and plan.build.tag == "cu128" and reinstall
    cuda = {"torch": "2.14.1+cu126", "torch_cuda": "12.6"}
    plan, reinstall = plan_torch(
        InstallOptions(reinstall_torch=True),
        cuda,
        PINS,
        record={},
        detect=lambda: report_for(smi.RTX_5090_LINUX_580),
        system="linux",
    )
    assert plan.build is not None and plan.build.tag == "cu130" and reinstall


def test_older_cuda_build_is_upgraded_on_the_same_build() -> None:
    installed = {"torch": "2.13.0+cu128", "torch_cuda": "12.8"}
    plan, reinstall = plan_torch(InstallOptions(), installed, PINS, record={}, system="linux")
    assert reinstall and plan.index_url == "https://download.pytorch.org/whl/cu128"


def test_new_override_reinstalls_same_override_keeps() -> None:
    installed = {"torch": "2.14.1+cu128", "torch_cuda": "12.8"}
    url = "https://download.pytorch.org/whl/cu126"
    _, reinstall = plan_torch(InstallOptions(index_url=url), installed, PINS, record={"index_url": None})
    assert reinstall
    _, reinstall = plan_torch(
        InstallOptions(index_url=url), {"torch": "2.14.1+cu126"}, PINS, record={"index_url": url}
    )
    assert not reinstall


def test_torch_command_pins_the_cuda_build_and_keeps_the_default_index() -> None:
    python = Path("/x/.venv/bin/python")
    command = torch_install_command(python, PINS, "https://download.pytorch.org/whl/cu128")
    assert command == [
        str(python), "-m", "pip", "install", "torch==2.14.1+cu128", "torchvision==0.29.1+cu128",
        "--extra-index-url", "https://download.pytorch.org/whl/cu128",
    ]  # fmt: skip
    assert torch_install_command(python, PINS, None)[4:] == ["torch==2.14.1", "torchvision==0.29.1"]
    assert "torch==2.14.1" in torch_install_command(python, PINS, "https://mirror.example/whl/cpu")


def test_xformers_comes_from_the_torch_build_index() -> None:
    python = Path("python")
    command, _ = xformers_command(python, {"torch": "2.14.1+cu128", "torch_cuda": "12.8"}, "https://d/whl")
    assert command is not None
    assert command[3:] == [
        "install",
        "xformers",
        "torch==2.14.1+cu128",
        "--extra-index-url",
        "https://d/whl/cu128",
    ]
    none, reason = xformers_command(python, {"torch": "2.14.1+cpu", "torch_cuda": None}, "https://d/whl")
    assert none is None and "CUDA build" in reason


def test_requirements_pins_are_read_from_the_repo() -> None:
    assert read_pins(ROOT / "requirements.txt") == {"torch": "2.14.1", "torchvision": "0.29.1"}


# ---------------------------------------------------------------------------------------------
# disk, venv, Windows paths
# ---------------------------------------------------------------------------------------------
Usage = namedtuple("Usage", "total used free")


def test_disk_shortfall_says_needed_and_free(tmp_path: Path) -> None:
    def small(path: str) -> Usage:
        return Usage(100 * disk.GB, 97 * disk.GB, 3 * disk.GB)

    message = disk.shortfall_message(
        tmp_path / "not-yet" / ".venv", 12 * disk.GB, "the install", disk_usage=small
    )
    assert message is not None and "12.0 GB is needed" in message and "3.0 GB is free" in message
    assert str(tmp_path) in message
    assert disk.shortfall_message(tmp_path, 2 * disk.GB, "x", disk_usage=small) is None


def test_venv_python_path_per_platform(tmp_path: Path) -> None:
    assert venv_python(tmp_path, is_windows=True) == tmp_path / "Scripts/python.exe"
    assert venv_python(tmp_path, is_windows=False) == tmp_path / "bin/python"


def test_broken_venvs_are_detected(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    assert venv_problem(venv) is None  # not there yet: just create it
    venv.mkdir()
    assert venv_problem(venv) == "pyvenv.cfg is missing"
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert "Scripts" in (venv_problem(venv, is_windows=True) or "")
    assert "bin" in (venv_problem(venv, is_windows=False) or "")
    python = venv_python(venv, is_windows=False)
    python.parent.mkdir()
    python.write_text("")

    def no_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "/x/.venv/bin/python: No module named pip\n")

    assert (
        venv_problem(venv, is_windows=False, run=no_pip)
        == "pip does not run in it (/x/.venv/bin/python: No module named pip)"
    )

    def works(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, "pip 25.2 from ...", "")

    assert venv_problem(venv, is_windows=False, run=works) is None


def test_long_path_warning_only_on_windows_without_long_paths() -> None:
    deep = Path("C:/Users/someone/Documents/" + "very long folder name/" * 5 + "sd-studio")
    assert long_path_warning(deep, is_windows=True, long_paths_enabled=False) is not None
    assert long_path_warning(deep, is_windows=True, long_paths_enabled=True) is None
    assert long_path_warning(deep, is_windows=False, long_paths_enabled=None) is None
    assert long_path_warning(Path("C:/sdstudio"), is_windows=True, long_paths_enabled=False) is None


# ---------------------------------------------------------------------------------------------
# quiet pip steps
# ---------------------------------------------------------------------------------------------
class FakeProcess:
    def __init__(self, lines: list[str], code: int) -> None:
        self.stdout = io.StringIO("".join(line + "\n" for line in lines))
        self.code = code

    def wait(self) -> int:
        return self.code


def fake_popen(lines: list[str], code: int):
    def popen(command, **kwargs):
        return FakeProcess(lines, code)

    return popen


def test_step_prints_one_line_per_step_and_logs_everything(tmp_path: Path) -> None:
    lines = [
        "Collecting torch==2.14.1+cu128",
        "  Downloading https://download.pytorch.org/whl/cu128/torch-2.14.1%2Bcu128-cp311-linux_x86_64.whl"
        " (2512.3 MB)",
        "Progress 1048576 of 2512300000",
        "Installing collected packages: torch, torchvision",
        "Successfully installed torch-2.14.1+cu128 torchvision-0.29.1+cu128",
    ]
    out = io.StringIO()
    log = tmp_path / "install.log"
    runner = StepRunner(log_path=log, total_steps=3, out=out, popen=fake_popen(lines, 0))
    installed = runner.run("PyTorch 2.14.1 with CUDA 12.8", ["pip", "install", "torch"])
    assert installed == ["torch-2.14.1+cu128", "torchvision-0.29.1+cu128"]
    printed = out.getvalue().splitlines()
    assert printed[0] == "SD Studio: [1/3] PyTorch 2.14.1 with CUDA 12.8 ..."
    assert printed[1].startswith(
        "SD Studio: [1/3] PyTorch 2.14.1 with CUDA 12.8: done, 2 package(s) installed"
    )
    assert len(printed) == 2
    text = log.read_text()
    assert "$ pip install torch" in text and "Successfully installed" in text


def test_failed_step_shows_last_lines_log_path_and_hint(tmp_path: Path) -> None:
    lines = [f"line {n}" for n in range(40)] + [
        "ERROR: Could not find a version that satisfies the requirement torch==2.14.1+cu130",
        "ERROR: No matching distribution found for torch==2.14.1+cu130",
    ]
    log = tmp_path / "install.log"
    runner = StepRunner(log_path=log, total_steps=2, out=io.StringIO(), popen=fake_popen(lines, 1))
    with pytest.raises(StepFailedError) as failure:
        runner.run("PyTorch", ["pip", "install", "torch"])
    message = str(failure.value)
    assert "No matching distribution found" in message and str(log) in message
    assert "line 39" in message and "line 5\n" not in message
    assert "--torch-index-url" in message
    assert failure.value.no_matching_wheel


def test_missing_wheel_falls_back_to_older_build_then_pypi(tmp_path: Path) -> None:
    tried: list[str] = []

    class Runner:
        def run(self, label, command, count=True):
            tried.append(
                command[command.index("--extra-index-url") + 1] if "--extra-index-url" in command else "pypi"
            )
            if len(tried) < 3:
                raise StepFailedError(
                    "x", tail=["ERROR: No matching distribution found for torch"], log_path=None
                )
            return []

    plan = choose_torch_build(report_for(smi.RTX_5090_LINUX_580), "linux")
    _install_torch(Runner(), Path("python"), plan, PINS, {}, [])  # type: ignore[arg-type]
    assert tried == [
        "https://download.pytorch.org/whl/cu130",
        "https://download.pytorch.org/whl/cu128",
        "pypi",
    ]


# ---------------------------------------------------------------------------------------------
# launch.py in a fresh copy of the repo
# ---------------------------------------------------------------------------------------------
def fresh_copy(tmp_path: Path, requirements: str | None = None) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "launch.py", repo / "launch.py")
    shutil.copytree(ROOT / "installer", repo / "installer", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "requirements.txt").write_text(requirements or (ROOT / "requirements.txt").read_text())
    return repo


def fake_smi_dir(tmp_path: Path, case: smi.SmiCase | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if case is not None:
        script = bin_dir / "nvidia-smi"
        script.write_text(smi.fake_nvidia_smi_script(case))
        script.chmod(0o755)
    return bin_dir


def launch_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SDSTUDIO_", "PIP_")) and key not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update({"PATH": str(bin_dir), "SDSTUDIO_SKIP_DISK_CHECK": "1", **extra})
    return env


def run_launch(
    repo: Path, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(repo / "launch.py"), *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_dry_run_with_an_rtx_4090_installs_the_cuda_12_8_build(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path)
    env = launch_env(fake_smi_dir(tmp_path, smi.RTX_4090_LINUX), SDSTUDIO_INSTALL_DRY_RUN="1")
    result = run_launch(repo, env, "--install-only")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    python = str(repo / ".venv" / "bin" / "python")
    assert "NVIDIA GeForce RTX 4090 (24 GB), driver 572.16 (supports CUDA 12.8)" in out
    assert (
        f"dry run, would run: {python} -m pip install torch==2.14.1+cu128 torchvision==0.29.1+cu128 "
        "--extra-index-url https://download.pytorch.org/whl/cu128"
    ) in out
    assert f"dry run, would run: {python} -m pip install -r {repo / 'requirements.txt'}" in out
    assert "[1/3]" in out and "[3/3]" in out
    assert "--no-cache-dir" not in out  # an interrupted install resumes from pip's cache
    assert not (repo / ".venv").exists()


def test_dry_run_without_gpu_and_with_the_override(tmp_path: Path) -> None:
    repo = fresh_copy(tmp_path)
    bin_dir = fake_smi_dir(tmp_path, None)
    result = run_launch(repo, launch_env(bin_dir, SDSTUDIO_INSTALL_DRY_RUN="1"), "--install-only")
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU found" in result.stdout
    assert "pip install torch==2.14.1 torchvision==0.29.1\n" in result.stdout
    url = "https://download.pytorch.org/whl/cpu"
    env = launch_env(bin_dir, SDSTUDIO_INSTALL_DRY_RUN="1", SDSTUDIO_TORCH_INDEX_URL=url)
    result = run_launch(repo, env, "--install-only")
    assert f"torch==2.14.1 torchvision==0.29.1 --extra-index-url {url}" in result.stdout


def _wheel(directory: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel (no dependencies) in ``directory/<name>/`` plus a PEP 503 index page."""
    project = directory / name.replace("_", "-")
    project.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = project / f"{dist}-py3-none-any.whl"
    meta = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    entries = {**files, **meta}
    record = "".join(f"{file},,\n" for file in entries) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for file, content in entries.items():
            archive.writestr(file, content)
        archive.writestr(f"{dist}.dist-info/RECORD", record)
    links = "".join(f'<a href="{wheel.name}">{wheel.name}</a>\n' for wheel in sorted(project.glob("*.whl")))
    (project / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return path


def test_fresh_install_from_a_local_cuda_index(tmp_path: Path) -> None:
    """The real install path: a new .venv, pip against a local stand-in for PyTorch's cu128 index."""
    mirror = tmp_path / "whl"
    version_py = "__version__ = '2.14.1+cu128'\ncuda = '12.8'\n"
    _wheel(
        mirror / "cu128", "torch", "2.14.1+cu128", {"torch/__init__.py": "", "torch/version.py": version_py}
    )
    _wheel(mirror / "cu128", "torchvision", "0.29.1+cu128", {"torchvision/__init__.py": ""})
    pypi = tmp_path / "pypi"
    _wheel(pypi, "sdstudio-test-dep", "1.0", {"sdstudio_test_dep.py": "VALUE = 1\n"})
    requirements = "torch==2.14.1\ntorchvision==0.29.1\nsdstudio-test-dep==1.0\n"
    repo = fresh_copy(tmp_path, requirements)
    env = launch_env(
        fake_smi_dir(tmp_path, smi.RTX_4090_LINUX),
        SDSTUDIO_PYTORCH_MIRROR=mirror.as_uri(),
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL=pypi.as_uri(),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    result = run_launch(repo, env, "--install-only", timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"PyTorch with CUDA 12.8 ({mirror.as_uri()}/cu128)" in out
    assert "[2/3] PyTorch 2.14.1 with CUDA 12.8: done, 2 package(s) installed" in out
    assert "[3/3] the other requirements (diffusers, transformers, gradio, ...): done" in out
    assert len(out.splitlines()) < 20  # quiet: no raw pip output on screen
    venv = repo / ".venv"
    assert json.loads((venv / ".sdstudio-torch.json").read_text())["index_url"] == f"{mirror.as_uri()}/cu128"
    logs = list((repo / "data" / "logs").glob("install-*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    assert f"torch==2.14.1+cu128 torchvision==0.29.1+cu128 --extra-index-url {mirror.as_uri()}/cu128" in log
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import torch.version, sdstudio_test_dep; print(torch.version.cuda)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "12.8"

    # A second run finds everything in place; a broken .venv is rebuilt with a message.
    result = run_launch(repo, env, "--install-only", timeout=300)
    assert result.returncode == 0 and "installing" not in result.stdout, result.stdout
    (venv / "bin" / "python").unlink()
    result = run_launch(repo, {**env, "SDSTUDIO_INSTALL_DRY_RUN": "1"}, "--install-only")
    assert "is incomplete (.venv/bin/python is missing)" in result.stdout, result.stdout + result.stderr


def test_launch_bat_finds_python_and_pauses_on_error() -> None:
    text = (ROOT / "launch.bat").read_bytes()
    assert b"\r\n" in text and b"\n" not in text.replace(b"\r\n", b"")
    script = text.decode("ascii")
    assert "py -3" in script and "python -c" in script
    assert '"%~dp0launch.py" %*' in script and "pause" in script


def test_disk_need_follows_the_build() -> None:
    from installer.environment import torch_disk_key

    cuda = choose_torch_build(report_for(smi.RTX_4090_WINDOWS), "win32")
    assert torch_disk_key(cuda, "win32") == "cuda"
    plain = choose_torch_build(GpuReport(), "win32")
    assert torch_disk_key(plain, "win32") == "cpu" and torch_disk_key(plain, "darwin") == "cpu"
    assert torch_disk_key(plain, "linux") == "default"  # PyPI's Linux build carries CUDA 13
    cpu = choose_torch_build(GpuReport(), "linux", override="https://download.pytorch.org/whl/cpu/")
    assert torch_disk_key(cpu, "linux") == "cpu"
