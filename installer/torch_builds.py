"""Which PyTorch build to install: the one table of CUDA builds, and the choice made from it.

PyTorch publishes one wheel index per CUDA build (``https://download.pytorch.org/whl/cu128``...). A
build runs when the NVIDIA driver supports its CUDA version, and only drives the GPUs whose
architecture it was compiled for. :data:`CUDA_BUILDS` holds, for each build we use, the minimum
driver on Linux and on Windows and the oldest GPU architecture in it; :func:`choose_torch_build`
picks the newest build that fits the machine, and the same decision serves torch, torchvision and
xFormers (PyTorch's CUDA indexes carry matching xFormers wheels).

Sources of the numbers (check them again when ``requirements.txt`` moves to a new torch):

* minimum drivers: NVIDIA's CUDA Toolkit release notes, table "CUDA Toolkit and Corresponding Driver
  Versions" (the GA release of each CUDA version), and the minor-version-compatibility floor of each
  CUDA major version (a 12.x build also runs, without PTX JIT, on any driver >= 525.60.13 / 527.41);
* builds per torch release: PyTorch's binary build matrix (``CUDA_ARCHES``), which was
  ["12.6", "12.8", "13.0"] for the last release whose matrix we could read. The builds published for
  torch 2.14.1 could not be checked from this workplace (no access to download.pytorch.org); if the
  chosen build has no wheel for the pinned torch, the installer tries the next older build the driver
  supports, then PyPI's default build, and says so;
* architectures: CUDA 12.8 builds dropped Maxwell/Pascal (sm_50-61), CUDA 13 dropped Volta (sm_70);
  Blackwell (RTX 50 series, sm_120) needs CUDA 12.8 or newer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from installer.gpu import GpuReport, driver_tuple

PYTORCH_WHEEL_BASE = "https://download.pytorch.org/whl"
"""Overridable with ``SDSTUDIO_PYTORCH_MIRROR`` (a mirror of PyTorch's wheel indexes; tests use a
local ``file://`` directory)."""


@dataclass(frozen=True)
class CudaBuild:
    """One CUDA build of PyTorch and what it needs from the machine."""

    tag: str
    cuda: tuple[int, int]
    min_driver_linux: str
    min_driver_windows: str
    oldest_gpu: tuple[int, int]
    """Oldest compute capability compiled in (7.5 = Turing, RTX 20 series)."""

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}"

    def min_driver(self, system: str) -> str:
        return self.min_driver_windows if system == "win32" else self.min_driver_linux

    def index_url(self, base: str = PYTORCH_WHEEL_BASE) -> str:
        return f"{base.rstrip('/')}/{self.tag}"


# Newest first. RTX 20 = Turing 7.5, RTX 30 = Ampere 8.6, RTX 40 = Ada 8.9, RTX 50 = Blackwell 12.0.
CUDA_BUILDS: tuple[CudaBuild, ...] = (
    CudaBuild("cu130", (13, 0), min_driver_linux="580.65.06", min_driver_windows="580.88", oldest_gpu=(7, 5)),
    CudaBuild("cu128", (12, 8), min_driver_linux="570.26", min_driver_windows="570.65", oldest_gpu=(7, 0)),
    CudaBuild("cu126", (12, 6), min_driver_linux="560.28.03", min_driver_windows="560.76", oldest_gpu=(5, 0)),
)
"""The CUDA builds of the pinned torch that the installer chooses from (newest first)."""

MINOR_COMPAT_FLOOR: dict[int, tuple[str, str]] = {12: ("525.60.13", "527.41"), 13: ("580.65.06", "580.88")}
"""Per CUDA major version: the oldest driver (Linux, Windows) that runs any build of that major."""

BLACKWELL_MIN_CUDA = (12, 8)


@dataclass(frozen=True)
class TorchPlan:
    """What to install for torch/torchvision (and xFormers), and why, in the user's words."""

    kind: str
    """``cuda`` (a CUDA build from PyTorch's index), ``default`` (PyPI's build: CPU on Windows, a CUDA
    13 build on Linux, MPS on macOS), ``override`` (the user's index) or ``keep`` (leave torch as is)."""
    summary: str
    index_url: str | None = None
    build: CudaBuild | None = None
    fallback_urls: tuple[str, ...] = ()
    """Older CUDA builds the driver also supports, tried in turn if the first has no wheel."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    """Warnings to print (old driver, GPU the build cannot use...)."""

    def requirement(self, package: str, version: str) -> str:
        """``torch==2.14.1+cu128`` for a known CUDA build (that exact wheel only exists on its index,
        so PyPI can never substitute its own build), else ``torch==2.14.1``."""
        if self.kind == "cuda" and self.build is not None:
            return f"{package}=={version}+{self.build.tag}"
        return f"{package}=={version}"


def platform_key(system: str) -> str:
    """``win32``/``linux``/``darwin`` from ``sys.platform`` (``linux2``, ``cygwin``... folded in)."""
    if system.startswith("win") or system == "cygwin":
        return "win32"
    if system.startswith("linux"):
        return "linux"
    if system == "darwin":
        return "darwin"
    return system


def build_for_tag(tag: str) -> CudaBuild | None:
    return next((build for build in CUDA_BUILDS if build.tag == tag), None)


def cuda_tag(cuda_version: str | None) -> str | None:
    """``"12.8"`` (``torch.version.cuda``) -> ``"cu128"``."""
    if not cuda_version:
        return None
    match = re.match(r"(\d+)\.(\d+)", cuda_version)
    return f"cu{match.group(1)}{match.group(2)}" if match else None


def driver_supports(build: CudaBuild, report: GpuReport, system: str) -> bool:
    """Whether the driver runs ``build`` fully (its CUDA version or newer): by driver version when
    known, else by the "CUDA Version" the driver reports."""
    if report.driver_version:
        return driver_tuple(report.driver_version) >= driver_tuple(build.min_driver(system))
    if report.cuda_version:
        return report.cuda_version >= build.cuda
    return False


def _minor_compat(build: CudaBuild, report: GpuReport, system: str) -> bool:
    floor = MINOR_COMPAT_FLOOR.get(build.cuda[0])
    if floor is None or not report.driver_version:
        return False
    needed = floor[1] if system == "win32" else floor[0]
    return driver_tuple(report.driver_version) >= driver_tuple(needed)


def _gpu_fits(build: CudaBuild, report: GpuReport) -> bool:
    """Every GPU's architecture is in the build (Blackwell needs CUDA 12.8+)."""
    for gpu in report.gpus:
        if gpu.is_blackwell and build.cuda < BLACKWELL_MIN_CUDA:
            return False
        if gpu.compute_capability is not None and gpu.compute_capability < build.oldest_gpu:
            return False
    return True


def oldest_usable_build(report: GpuReport) -> CudaBuild | None:
    """The build that asks least of the driver among those that drive every GPU here."""
    fitting = [build for build in CUDA_BUILDS if _gpu_fits(build, report)]
    return fitting[-1] if fitting else None


def choose_torch_build(
    report: GpuReport,
    system: str,
    *,
    override: str | None = None,
    wheel_base: str = PYTORCH_WHEEL_BASE,
) -> TorchPlan:
    """The PyTorch build for this machine.

    ``system`` is ``sys.platform``. ``override`` is ``--torch-index-url`` / ``SDSTUDIO_TORCH_INDEX_URL``
    and always wins. No NVIDIA GPU, or macOS: PyPI's default build. With a GPU: the newest build in
    :data:`CUDA_BUILDS` that the driver supports and that has code for every GPU; when the driver is
    older than every build's full requirement but within CUDA's minor-version compatibility, the
    oldest fitting build with a note; when it is older still, PyPI's default build and a note saying
    which driver to install.
    """
    system = platform_key(system)
    if override:
        return TorchPlan(
            kind="override",
            index_url=override.strip(),
            summary=f"PyTorch from {override.strip()} (--torch-index-url / SDSTUDIO_TORCH_INDEX_URL)",
        )
    if system == "darwin":
        return TorchPlan(
            kind="default",
            summary="PyTorch's standard macOS build (Apple Silicon GPUs through MPS; no CUDA on macOS)",
        )
    if not report.has_gpu:
        what = "CPU build" if system == "win32" else "standard build (runs on the CPU without an NVIDIA GPU)"
        notes: list[str] = []
        if report.error:
            notes.append(
                f"nvidia-smi is installed but failed ({report.error}). If this PC has an NVIDIA GPU, "
                "reinstall or update its driver, restart, and run the install again with --reinstall-torch."
            )
        elif system == "linux":
            notes.append(
                "Without an NVIDIA GPU, --torch-index-url https://download.pytorch.org/whl/cpu installs a "
                "CPU-only PyTorch that is about 3 GB smaller."
            )
        return TorchPlan(kind="default", summary=f"no NVIDIA GPU found: PyTorch's {what}", notes=tuple(notes))

    gpus = report.describe()
    fitting = [build for build in CUDA_BUILDS if _gpu_fits(build, report)]
    supported = [build for build in fitting if driver_supports(build, report, system)]
    if supported:
        chosen = supported[0]
        return TorchPlan(
            kind="cuda",
            build=chosen,
            index_url=chosen.index_url(wheel_base),
            fallback_urls=tuple(build.index_url(wheel_base) for build in supported[1:]),
            summary=f"{gpus}: PyTorch with CUDA {chosen.cuda_text} ({chosen.index_url(wheel_base)})",
        )
    compatible = [build for build in fitting if _minor_compat(build, report, system)]
    if compatible:
        chosen = compatible[-1]
        note = (
            f"NVIDIA driver {report.driver_version} is older than CUDA {chosen.cuda_text} asks for "
            f"({chosen.min_driver(system)}+); the CUDA {chosen.cuda_text} build runs on it through CUDA's "
            f"minor-version compatibility. Updating the driver to {chosen.min_driver(system)} or newer is "
            "recommended."
        )
        return TorchPlan(
            kind="cuda",
            build=chosen,
            index_url=chosen.index_url(wheel_base),
            summary=f"{gpus}: PyTorch with CUDA {chosen.cuda_text} ({chosen.index_url(wheel_base)})",
            notes=(note,),
        )
    return TorchPlan(
        kind="default",
        summary=f"{gpus}: this driver is too old for PyTorch's CUDA builds; installing the standard build",
        notes=(driver_too_old_message(report, system),),
    )


def driver_too_old_message(report: GpuReport, system: str) -> str:
    """What to install so that a CUDA build runs on every GPU here (the oldest build that fits)."""
    build = oldest_usable_build(report)
    gpus = ", ".join(gpu.name for gpu in report.gpus) or "this NVIDIA GPU"
    if build is None:
        return f"No CUDA build of PyTorch in SD Studio's table supports {gpus}; images render on the CPU."
    needed = build.min_driver(platform_key(system))
    have = f"driver {report.driver_version}" if report.driver_version else "this driver"
    return (
        f"{gpus} needs NVIDIA driver {needed} or newer for PyTorch (CUDA {build.cuda_text}); {have} is too "
        "old, so images render on the CPU. Install the current driver from "
        "https://www.nvidia.com/Download/index.aspx "
        f"(Linux: your distribution's nvidia-driver package), restart, then run: {reinstall_command(system)}"
    )


def reinstall_command(system: str) -> str:
    """The one command that re-chooses and reinstalls PyTorch, in the user's shell."""
    from installer.launch_command import launch_command

    return launch_command("--reinstall-torch", system="win32" if platform_key(system) == "win32" else "linux")


def gpu_unusable_message(
    report: GpuReport,
    system: str,
    *,
    torch_version: str | None,
    torch_cuda: str | None,
    cuda_available: bool,
) -> str | None:
    """Why PyTorch cannot use the NVIDIA GPU that ``nvidia-smi`` reports, with the one fix; None when
    there is no NVIDIA GPU or PyTorch uses it.

    ``torch_cuda`` is ``torch.version.cuda`` (None for a CPU-only build).
    """
    if not report.has_gpu or cuda_available:
        return None
    system = platform_key(system)
    gpus = ", ".join(gpu.name for gpu in report.gpus)
    torch_text = f"PyTorch {torch_version}" if torch_version else "PyTorch"
    cpu_note = "Images are rendered on the CPU, which is many times slower."
    plan = choose_torch_build(report, system)
    if plan.kind != "cuda":
        return f"{gpus} found, but {torch_text} cannot use it. " + driver_too_old_message(report, system)
    cuda_text = plan.build.cuda_text if plan.build else "?"
    fix = f"Fix: {reinstall_command(system)} (installs PyTorch with CUDA {cuda_text} for this driver)."
    if not torch_cuda:
        return f"{gpus} found, but {torch_text} is a CPU-only build. {cpu_note} {fix}"
    installed = build_for_tag(cuda_tag(torch_cuda) or "")
    torch_major_minor = tuple(int(x) for x in re.findall(r"\d+", torch_cuda)[:2])
    driver_cuda = report.cuda_version
    too_new = (installed is not None and not driver_supports(installed, report, system)) or (
        installed is None and driver_cuda is not None and torch_major_minor > driver_cuda
    )
    if too_new:
        driver = f"driver {report.driver_version}" if report.driver_version else "the driver"
        supports = (
            f" supports CUDA up to {report.cuda_text}" if report.cuda_text else " is older than it needs"
        )
        update = f" or update the NVIDIA driver to {installed.min_driver(system)}+" if installed else ""
        return (
            f"{gpus} found, but {torch_text} is built for CUDA {torch_cuda} and {driver}{supports}. "
            f"{cpu_note} {fix[:-1]}{update}."
        )
    return (
        f"{gpus} found and {torch_text} is a CUDA {torch_cuda} build, but CUDA is not available to it "
        "(the driver is not loaded, a restart after a driver update is pending, or CUDA_VISIBLE_DEVICES "
        f"hides the GPU). {cpu_note} Check that `nvidia-smi` works, restart, then run: "
        f"{reinstall_command(system).replace('--reinstall-torch', 'doctor')}"
    )
