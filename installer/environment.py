"""The ``.venv`` life cycle that ``launch.py`` drives: create or repair it, install the right
PyTorch for the machine, then the rest of ``requirements.txt`` (standard library only).

Order of a first install:

1. ``.venv`` is checked; one that an interrupted first run left half-made (no ``pyvenv.cfg``, no
   Python, a Python that does not start, no pip) is deleted and made again, with a message.
2. The PyTorch build is chosen (:func:`installer.torch_builds.choose_torch_build`) unless a CUDA
   build of the pinned version is already installed, which is kept.
3. Free disk space is checked against what the install needs.
4. pip is upgraded, torch/torchvision are installed from the chosen index, then the rest, each as one
   quiet step (:mod:`installer.pip_steps`) with the full log in ``data/logs/``.

``SDSTUDIO_INSTALL_DRY_RUN=1`` prints the pip commands of steps 4 instead of running them, and
creates no ``.venv``: the same code chooses and builds the commands either way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv as venv_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from installer import disk
from installer.gpu import GpuReport, detect_nvidia
from installer.pip_steps import StepFailedError, StepRunner, dry_run_requested, new_log_path
from installer.torch_builds import (
    PYTORCH_WHEEL_BASE,
    TorchPlan,
    build_for_tag,
    choose_torch_build,
    cuda_tag,
    platform_key,
)

REQUIRED_MODULES = ("torch", "diffusers", "transformers", "gradio", "pydantic_settings", "safetensors")
INDEX_URL_ENV = "SDSTUDIO_TORCH_INDEX_URL"
MIRROR_ENV = "SDSTUDIO_PYTORCH_MIRROR"
MARKER_NAME = ".sdstudio-requirements"
TORCH_RECORD_NAME = ".sdstudio-torch.json"
_WINDOWS_MAX_PATH = 260
_DEEPEST_PACKAGE_PATH = 160  # longest path inside .venv that torch/transformers wheels unpack, about

# Run by the venv's Python: versions and CUDA build without importing torch (which takes seconds).
_PROBE = r"""
import importlib.metadata as md, importlib.util, json, pathlib, re
out = {}
for name in ("torch", "torchvision", "xformers"):
    try:
        out[name] = md.version(name)
    except md.PackageNotFoundError:
        out[name] = None
cuda = None
spec = importlib.util.find_spec("torch")
if spec is not None and spec.submodule_search_locations:
    version_file = pathlib.Path(list(spec.submodule_search_locations)[0]) / "version.py"
    if version_file.is_file():
        found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", version_file.read_text(), re.M)
        cuda = found.group(1) if found else None
out["torch_cuda"] = cuda
print(json.dumps(out))
"""


def say(message: str) -> None:
    print(f"SD Studio: {message}", flush=True)


@dataclass(frozen=True)
class InstallOptions:
    """What the command line and environment ask of the installer."""

    skip: bool = False
    index_url: str | None = None
    reinstall_torch: bool = False
    install_only: bool = False
    xformers: bool = False
    dry_run: bool = False
    wheel_base: str = PYTORCH_WHEEL_BASE

    @classmethod
    def from_argv(cls, argv: Sequence[str], environ: dict[str, str] | None = None) -> InstallOptions:
        env = os.environ if environ is None else environ
        index_url = env.get(INDEX_URL_ENV) or None
        for position, arg in enumerate(argv):
            if arg == "--torch-index-url" and position + 1 < len(argv):
                index_url = argv[position + 1]
            elif arg.startswith("--torch-index-url="):
                index_url = arg.split("=", 1)[1]
        return cls(
            skip=env.get("SDSTUDIO_SKIP_VENV") == "1" or "--skip-venv" in argv,
            index_url=index_url,
            reinstall_torch="--reinstall-torch" in argv,
            install_only="--install-only" in argv,
            xformers="--xformers" in argv,
            dry_run=dry_run_requested(),
            wheel_base=env.get(MIRROR_ENV) or PYTORCH_WHEEL_BASE,
        )


def venv_python(venv: Path, *, is_windows: bool | None = None) -> Path:
    """The venv's interpreter: ``Scripts\\python.exe`` on Windows, ``bin/python`` elsewhere."""
    windows = os.name == "nt" if is_windows is None else is_windows
    return venv / ("Scripts/python.exe" if windows else "bin/python")


def venv_problem(
    venv: Path,
    *,
    is_windows: bool | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> str | None:
    """Why an existing ``.venv`` cannot be used (None: it can, or it does not exist yet)."""
    if not venv.exists():
        return None
    if not (venv / "pyvenv.cfg").is_file():
        return "pyvenv.cfg is missing"
    python = venv_python(venv, is_windows=is_windows)
    if not python.exists():
        return f"{python.relative_to(venv.parent)} is missing"
    try:
        result = run(
            [str(python), "-m", "pip", "--version"], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"its Python does not start ({exc})"
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        return f"pip does not run in it ({detail[-1] if detail else f'exit code {result.returncode}'})"
    return None


def create_venv(venv: Path) -> None:
    """Create ``venv`` with pip. On Windows copies rather than symlinks (the default there)."""
    venv_module.create(venv, with_pip=True, clear=False)


def repair_or_create_venv(venv: Path, *, dry_run: bool = False) -> bool:
    """Make sure ``venv`` exists and works; return True when it was (re)created."""
    problem = venv_problem(venv)
    if problem is not None:
        say(
            f"{venv} is incomplete ({problem}), probably left by an interrupted first run: deleting it and "
            "creating it again (downloads already in pip's cache are reused)."
        )
        if not dry_run:
            shutil.rmtree(venv)
    elif venv.exists():
        return False
    else:
        say(f"first run: creating a Python virtual environment in {venv} ...")
    if dry_run:
        say("dry run: .venv is not created.")
    else:
        create_venv(venv)
    return True


def read_pins(requirements: Path) -> dict[str, str]:
    """``{"torch": "2.14.1", "torchvision": "0.29.1"}`` from ``requirements.txt``."""
    pins: dict[str, str] = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*(torch|torchvision)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def installed_torch(python: Path) -> dict[str, str | None]:
    """torch/torchvision/xformers versions and ``torch.version.cuda`` in ``python``'s environment
    (empty when it cannot be asked)."""
    if not python.exists():
        return {}
    try:
        result = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
        )
        return json.loads(result.stdout) if result.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


def long_path_warning(root: Path, *, is_windows: bool, long_paths_enabled: bool | None) -> str | None:
    """On Windows without long paths, a deep install folder makes pip fail on torch's deepest files."""
    if not is_windows or long_paths_enabled:
        return None
    if len(str(root)) + _DEEPEST_PACKAGE_PATH < _WINDOWS_MAX_PATH:
        return None
    return (
        f"this folder's path is {len(str(root))} characters long and Windows long paths are off, so pip may "
        "fail on PyTorch's deepest files. Move SD Studio to a short folder such as C:\\sdstudio, or enable "
        "long paths (PowerShell as administrator): New-ItemProperty -Path "
        "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\FileSystem -Name LongPathsEnabled -Value 1 "
        "-PropertyType DWORD -Force"
    )


def windows_long_paths_enabled() -> bool | None:
    """``LongPathsEnabled`` from the registry (None where there is no registry)."""
    try:
        import winreg  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            value, _ = winreg.QueryValueEx(key, "LongPathsEnabled")
    except OSError:
        return False
    return bool(value)


def _read_record(venv: Path) -> dict[str, object]:
    try:
        return json.loads((venv / TORCH_RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def plan_torch(
    options: InstallOptions,
    installed: dict[str, str | None],
    pins: dict[str, str],
    *,
    record: dict[str, object],
    detect: Callable[[], GpuReport] = detect_nvidia,
    system: str = sys.platform,
) -> tuple[TorchPlan, bool]:
    """The torch plan and whether torch must be (re)installed.

    An installed CUDA build of the pinned version is kept unless ``--reinstall-torch`` or a new
    ``--torch-index-url`` asks otherwise; a CUDA build of another version is upgraded from the same
    CUDA build's index.
    """
    version = installed.get("torch")
    pinned = pins.get("torch")
    same_version = bool(version and pinned and version.split("+")[0] == pinned)
    if options.index_url:
        plan = choose_torch_build(GpuReport(), system, override=options.index_url)
        changed = record.get("index_url") != options.index_url
        return plan, options.reinstall_torch or changed or not same_version
    build = build_for_tag(cuda_tag(installed.get("torch_cuda")) or "")
    if version and installed.get("torch_cuda") and not options.reinstall_torch:
        if same_version:
            return TorchPlan(kind="keep", summary=f"keeping the installed PyTorch {version}"), False
        if build is not None:
            plan = TorchPlan(
                kind="cuda",
                build=build,
                index_url=build.index_url(options.wheel_base),
                summary=f"upgrading PyTorch {version} to {pinned} with the same CUDA {build.cuda_text} build",
            )
            return plan, True
    plan = choose_torch_build(detect(), system, wheel_base=options.wheel_base)
    if same_version and not options.reinstall_torch and plan.kind == "default":
        return TorchPlan(kind="keep", summary=f"keeping the installed PyTorch {version}"), False
    return plan, True


def torch_install_command(python: Path, pins: dict[str, str], index_url: str | None) -> list[str]:
    """``python -m pip install torch==V[+cuXXX] torchvision==W[+cuXXX] [--extra-index-url URL]``.

    ``--extra-index-url`` keeps the user's own index (PyPI or a mirror) for torch's dependencies. When
    the index is one of :data:`~installer.torch_builds.CUDA_BUILDS` (its last path part is ``cu128``...),
    the ``+cu128`` pins make sure torch itself comes from it: that exact version exists nowhere else.
    """
    tag = index_url.rstrip("/").rsplit("/", 1)[-1] if index_url else ""
    build = build_for_tag(tag)
    command = [str(python), "-m", "pip", "install"]
    for package in ("torch", "torchvision"):
        if package not in pins:
            command.append(package)
        elif build is not None:
            command.append(f"{package}=={pins[package]}+{build.tag}")
        else:
            command.append(f"{package}=={pins[package]}")
    if index_url:
        command += ["--extra-index-url", index_url]
    return command


def torch_disk_key(plan: TorchPlan, system: str) -> str:
    """Which :data:`installer.disk.INSTALL_NEEDS_GB` entry the torch step needs: PyPI's default build is
    CPU-only on Windows and macOS but a CUDA build on Linux."""
    if plan.kind == "cuda":
        return "cuda"
    if plan.kind == "override":
        return "cpu" if (plan.index_url or "").rstrip("/").endswith("/cpu") else "cuda"
    return "cpu" if platform_key(system) in ("win32", "darwin") else "default"


def _pip_supports_raw_progress(python: Path) -> bool:
    """pip 24.1+ prints download progress as ``Progress N of M`` lines with ``--progress-bar raw``."""
    try:
        result = subprocess.run(
            [str(python), "-m", "pip", "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    match = re.match(r"pip (\d+)\.(\d+)", result.stdout)
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= (24, 1)


def install(
    root: Path,
    venv: Path,
    python: Path,
    options: InstallOptions,
    *,
    digest: str,
    detect: Callable[[], GpuReport] = detect_nvidia,
    system: str = sys.platform,
) -> None:
    """Install the requirements into ``python``'s environment (see the module docstring)."""
    requirements = root / "requirements.txt"
    pins = read_pins(requirements)
    installed = {} if options.dry_run and not python.exists() else installed_torch(python)
    plan, torch_step = plan_torch(
        options, installed, pins, record=_read_record(venv), detect=detect, system=system
    )
    say(f"PyTorch: {plan.summary}")
    for note in plan.notes:
        say(f"note: {note}")
    warning = long_path_warning(
        root, is_windows=platform_key(system) == "win32", long_paths_enabled=windows_long_paths_enabled()
    )
    if warning:
        say(f"warning: {warning}")

    needed = disk.INSTALL_NEEDS_GB["rest"]
    if torch_step:
        needed += disk.INSTALL_NEEDS_GB[torch_disk_key(plan, system)]
    shortfall = None
    if os.environ.get(disk.SKIP_ENV) != "1":
        shortfall = disk.shortfall_message(venv, int(needed * disk.GB), "installing SD Studio's requirements")
    if shortfall:
        say(shortfall)
        raise SystemExit(1)
    say(
        f"installing into {venv} (about {needed:.0f} GB on first run; an interrupted install resumes "
        "where it stopped when run again)"
    )

    log_path = None if options.dry_run else new_log_path(root / "data" / "logs")
    runner = StepRunner(log_path=log_path, total_steps=3 if torch_step else 2, dry_run=options.dry_run)
    if log_path is not None:
        say(f"full pip log: {log_path}")
    pip = [str(python), "-m", "pip"]
    try:
        runner.run("pip (the package installer itself)", [*pip, "install", "--upgrade", "pip"])
    except StepFailedError as exc:
        say(f"could not upgrade pip; continuing with the installed one ({exc.log_path})")
    raw = [] if options.dry_run or not _pip_supports_raw_progress(python) else ["--progress-bar", "raw"]
    if torch_step:
        _install_torch(runner, python, plan, pins, installed, raw)
    runner.run(
        "the other requirements (diffusers, transformers, gradio, ...)",
        [*pip, "install", "-r", str(requirements), *raw],
    )
    if options.dry_run:
        say("dry run: nothing was installed.")
        raise SystemExit(0)
    if torch_step:
        record = {
            "kind": plan.kind,
            "index_url": plan.index_url,
            "build": plan.build.tag if plan.build else None,
        }
        (venv / TORCH_RECORD_NAME).write_text(json.dumps(record), encoding="utf-8")
    (venv / MARKER_NAME).write_text(digest, encoding="utf-8")


def _install_torch(
    runner: StepRunner,
    python: Path,
    plan: TorchPlan,
    pins: dict[str, str],
    installed: dict[str, str | None],
    raw: list[str],
) -> None:
    """torch/torchvision from the plan's index; older builds the driver supports, then PyPI's build, when
    an index has no wheel of the pinned version."""
    pip = [str(python), "-m", "pip"]
    label = "PyTorch " + pins.get("torch", "")
    if plan.build is not None:
        label += f" with CUDA {plan.build.cuda_text}"
    if installed.get("torch"):
        present = [name for name in ("torch", "torchvision", "xformers") if installed.get(name)]
        runner.run(
            "removing the PyTorch build being replaced", [*pip, "uninstall", "-y", *present], count=False
        )
    candidates: list[str | None] = [plan.index_url, *plan.fallback_urls]
    if plan.kind == "cuda":
        candidates.append(None)
    for position, index_url in enumerate(candidates):
        try:
            runner.run(label, [*torch_install_command(python, pins, index_url), *raw], count=position == 0)
            return
        except StepFailedError as exc:
            if not exc.no_matching_wheel or position + 1 == len(candidates):
                raise
            following = candidates[position + 1]
            say(
                f"{index_url} has no wheel of torch {pins.get('torch')} for this system; trying "
                f"{following or 'the standard PyPI build'} instead."
            )


def xformers_command(
    python: Path, installed: dict[str, str | None], wheel_base: str
) -> tuple[list[str] | None, str]:
    """The pip command for an xFormers build matching the installed torch (same CUDA index, torch
    pinned so pip cannot swap it), or None with the reason."""
    version = installed.get("torch")
    if not version:
        return None, "PyTorch is not installed"
    tag = cuda_tag(installed.get("torch_cuda"))
    if tag is None:
        return None, f"xFormers needs a CUDA build of PyTorch and PyTorch {version} is not one"
    index = f"{wheel_base.rstrip('/')}/{tag}"
    command = [
        str(python),
        "-m",
        "pip",
        "install",
        "xformers",
        f"torch=={version}",
        "--extra-index-url",
        index,
    ]
    return command, f"xFormers for PyTorch {version} from {index}"


def ensure_xformers(options: InstallOptions, python: Path | None = None) -> None:
    """``--xformers`` installs a matching xFormers on first use, as A1111 does; failure is not fatal
    (the engine falls back to PyTorch SDPA and says so)."""
    if not options.xformers or importlib.util.find_spec("xformers") is not None:
        return
    python = python or Path(sys.executable)
    installed = installed_torch(python)
    command, what = xformers_command(python, installed, options.wheel_base)
    if command is None:
        say(f"--xformers: not installing xFormers: {what}; PyTorch SDPA attention will be used.")
        return
    say(f"--xformers: installing {what} ...")
    logs = Path(__file__).resolve().parent.parent / "data" / "logs"
    log_path = None if options.dry_run else new_log_path(logs, "xformers")
    runner = StepRunner(log_path=log_path, total_steps=1, dry_run=options.dry_run)
    try:
        runner.run("xFormers", command)
    except StepFailedError as exc:
        say(f"xFormers could not be installed; PyTorch SDPA attention will be used.\n{exc}")


def requirements_digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def restart_in_venv(python: Path, script: Path, argv: Sequence[str]) -> None:
    """Run the launcher again inside ``.venv``. POSIX replaces the process; Windows' ``os.execv``
    detaches the child from the console (the prompt returns while the studio still prints), so there
    the child is waited for and its exit code passed on."""
    say("restarting inside .venv ...")
    command = [str(python), str(script), *argv]
    if os.name == "nt":
        raise SystemExit(subprocess.call(command))
    os.execv(str(python), command)


def ensure_environment(root: Path, script: Path, argv: Sequence[str]) -> None:
    """Create/repair ``.venv`` and install into it when the running Python lacks the studio's
    dependencies or ``requirements.txt`` changed; then restart inside it. See the module docstring."""
    options = InstallOptions.from_argv(argv)
    if options.skip:
        return
    venv = root / ".venv"
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    requirements = root / "requirements.txt"
    digest = requirements_digest(requirements)
    marker = venv / MARKER_NAME
    in_venv = Path(sys.prefix).resolve() == venv.resolve()
    marker_ok = marker.is_file() and marker.read_text(encoding="utf-8").strip() == digest
    torch_change = options.reinstall_torch or (
        options.index_url is not None and _read_record(venv).get("index_url") != options.index_url
    )
    if not missing and not torch_change and not options.install_only and (not in_venv or marker_ok):
        return
    if not missing and not in_venv and torch_change and not venv.exists():
        python = Path(sys.executable)  # the user's own environment: change torch there
        say(f"changing PyTorch in the running Python's environment ({sys.prefix})")
    else:
        if not in_venv:
            repair_or_create_venv(venv, dry_run=options.dry_run)
        python = venv_python(venv)
    if options.dry_run or not marker_ok or torch_change:
        try:
            install(root, venv, python, options, digest=digest)
        except StepFailedError as exc:
            say(str(exc))
            raise SystemExit(1) from None
    if options.install_only:
        from installer.launch_command import launch_command

        say(f"install finished. Start the studio with: {launch_command()}")
        raise SystemExit(0)
    if in_venv or python == Path(sys.executable):
        return
    restart_in_venv(python, script, argv)
