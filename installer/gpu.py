"""Find NVIDIA GPUs and their driver with ``nvidia-smi`` (standard library only).

``nvidia-smi`` ships with every NVIDIA driver on Windows and Linux, so it is the one source that works
before PyTorch is installed. Two of its outputs are read:

* ``nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader``: one
  line per GPU (``compute_cap`` needs a 2021+ driver; older ones are asked without it);
* the plain ``nvidia-smi`` banner, whose header says ``CUDA Version: 12.8``: the newest CUDA the
  driver supports. No ``--query-gpu`` field reports that, so the banner is read as well, and it is
  also the fallback for GPU names and memory when the query fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

QUERY_FIELDS = "name,memory.total,driver_version,compute_cap"
QUERY_FIELDS_OLD_DRIVER = "name,memory.total,driver_version"
_TIMEOUT_S = 20.0
_MIB = 1024**2

# Where the driver installs nvidia-smi on Windows when it is not on PATH (older drivers used NVSMI).
_WINDOWS_LOCATIONS = (
    r"C:\Windows\System32\nvidia-smi.exe",
    r"C:\Program Files\NVIDIA Corporation\NVSMI\nvidia-smi.exe",
)

_BANNER_DRIVER = re.compile(r"Driver Version:\s*([0-9][0-9.]*)")
_BANNER_CUDA = re.compile(r"CUDA Version:\s*([0-9]+)\.([0-9]+)")
# "|   0  NVIDIA GeForce RTX 4090        Off |" (Linux) / "...  WDDM  |" (Windows); the name may be cut.
_BANNER_GPU_ROW = re.compile(r"^\|\s+(\d+)\s+(.+?)\s+(?:On|Off|WDDM|TCC|MCDM)\s*\|")
_BANNER_MEMORY = re.compile(r"(\d+)MiB\s*/\s*(\d+)MiB")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


@dataclass(frozen=True)
class NvidiaGpu:
    """One GPU as ``nvidia-smi`` describes it."""

    name: str
    memory_mib: int | None = None
    compute_capability: tuple[int, int] | None = None

    @property
    def memory_gib(self) -> float | None:
        return None if self.memory_mib is None else self.memory_mib * _MIB / 1024**3

    @property
    def is_blackwell(self) -> bool:
        """RTX 50 series and other Blackwell parts, which only CUDA 12.8+ builds of PyTorch can drive."""
        if self.compute_capability is not None:
            return self.compute_capability >= (10, 0)
        return bool(re.search(r"RTX\s*50[5-9]0|Blackwell|\bB[12]00\b|GB[12]0\d", self.name, re.IGNORECASE))

    def describe(self) -> str:
        memory = f" ({self.memory_gib:.0f} GB)" if self.memory_gib is not None else ""
        return f"{self.name}{memory}"


@dataclass(frozen=True)
class GpuReport:
    """What ``nvidia-smi`` said: GPUs, driver version and the newest CUDA the driver supports.

    ``error`` is set when ``nvidia-smi`` exists but failed (typically "couldn't communicate with the
    NVIDIA driver": a driver that is installed but not loaded, or a reboot pending).
    """

    gpus: tuple[NvidiaGpu, ...] = ()
    driver_version: str | None = None
    cuda_version: tuple[int, int] | None = None
    nvidia_smi: str | None = None
    error: str | None = None
    raw: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def any_blackwell(self) -> bool:
        return any(gpu.is_blackwell for gpu in self.gpus)

    @property
    def cuda_text(self) -> str | None:
        return None if self.cuda_version is None else f"{self.cuda_version[0]}.{self.cuda_version[1]}"

    def describe(self) -> str:
        """One line: "NVIDIA GeForce RTX 4090 (24 GB), driver 572.16 (CUDA 12.8)"."""
        if not self.gpus:
            if self.error:
                return f"nvidia-smi failed: {self.error}"
            return "no NVIDIA GPU found"
        names = ", ".join(gpu.describe() for gpu in self.gpus)
        driver = f", driver {self.driver_version}" if self.driver_version else ""
        cuda = f" (supports CUDA {self.cuda_text})" if self.cuda_text else ""
        return f"{names}{driver}{cuda}"

    def to_dict(self) -> dict[str, object]:
        return {
            "gpus": [
                {
                    "name": gpu.name,
                    "memory_mib": gpu.memory_mib,
                    "compute_capability": (
                        None if gpu.compute_capability is None else "{}.{}".format(*gpu.compute_capability)
                    ),
                }
                for gpu in self.gpus
            ],
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_text,
            "nvidia_smi": self.nvidia_smi,
            "error": self.error,
        }


def driver_tuple(version: str) -> tuple[int, ...]:
    """``"572.16"`` -> ``(572, 16)``; ``"570.86.15"`` -> ``(570, 86, 15)`` (compares as numbers)."""
    parts = []
    for piece in version.strip().split("."):
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group(0)) if digits else 0)
    return tuple(parts)


def _memory_mib(text: str) -> int | None:
    match = re.search(r"(\d+(?:\.\d+)?)\s*(MiB|GiB|MB|GB)?", text)
    if match is None:
        return None
    value = float(match.group(1))
    unit = (match.group(2) or "MiB").lower()
    return int(value * 1024) if unit in ("gib", "gb") else int(value)


def _compute_capability(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_query_csv(text: str) -> tuple[list[NvidiaGpu], str | None]:
    """GPUs and driver version from ``--query-gpu=name,memory.total,driver_version[,compute_cap]``
    ``--format=csv,noheader`` output (a header line, if present, is skipped)."""
    gpus: list[NvidiaGpu] = []
    driver: str | None = None
    for line in text.splitlines():
        fields = [part.strip() for part in line.split(",")]
        if len(fields) < 3 or fields[0].lower() == "name" or not fields[0]:
            continue
        name, memory, version = fields[0], fields[1], fields[2]
        if not re.match(r"\d", version):
            continue  # not a data line (an error message that happens to contain commas)
        capability = _compute_capability(fields[3]) if len(fields) > 3 else None
        gpus.append(NvidiaGpu(name=name, memory_mib=_memory_mib(memory), compute_capability=capability))
        driver = driver or version
    return gpus, driver


def parse_banner(text: str) -> tuple[list[NvidiaGpu], str | None, tuple[int, int] | None]:
    """GPUs (names may be cut short by the table), driver version and CUDA version from plain
    ``nvidia-smi`` output."""
    driver_match = _BANNER_DRIVER.search(text)
    cuda_match = _BANNER_CUDA.search(text)
    gpus: list[NvidiaGpu] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        row = _BANNER_GPU_ROW.match(line)
        if row is None:
            continue
        memory = None
        if index + 1 < len(lines):
            used_total = _BANNER_MEMORY.search(lines[index + 1])
            if used_total is not None:
                memory = int(used_total.group(2))
        gpus.append(NvidiaGpu(name=row.group(2).strip(), memory_mib=memory))
    cuda = (int(cuda_match.group(1)), int(cuda_match.group(2))) if cuda_match else None
    return gpus, (driver_match.group(1) if driver_match else None), cuda


def find_nvidia_smi(
    which: Callable[[str], str | None] = shutil.which, is_windows: bool | None = None
) -> str | None:
    """Path of ``nvidia-smi``: on PATH, else (Windows) where the driver installs it."""
    found = which("nvidia-smi")
    if found:
        return found
    if os.name == "nt" if is_windows is None else is_windows:
        for candidate in _WINDOWS_LOCATIONS:
            if Path(candidate).is_file():
                return candidate
    return None


def _run(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False, errors="replace"
    )


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def detect_nvidia(
    run: Runner = _run,
    which: Callable[[str], str | None] = shutil.which,
    *,
    is_windows: bool | None = None,
) -> GpuReport:
    """Ask ``nvidia-smi`` about the machine's NVIDIA GPUs. Never raises: no tool, a timeout or a
    failing driver become a report without GPUs (with ``error`` set when the tool itself failed)."""
    smi = find_nvidia_smi(which, is_windows)
    if smi is None:
        return GpuReport()
    raw: dict[str, str] = {}
    try:
        query = run([smi, f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"])
        if query.returncode != 0 and "compute_cap" in (query.stdout + query.stderr):
            query = run([smi, f"--query-gpu={QUERY_FIELDS_OLD_DRIVER}", "--format=csv,noheader,nounits"])
        banner = run([smi])
    except (OSError, subprocess.SubprocessError) as exc:
        return GpuReport(nvidia_smi=smi, error=f"could not run {smi}: {exc}")
    raw["query"] = query.stdout
    raw["banner"] = banner.stdout
    gpus, driver = parse_query_csv(query.stdout) if query.returncode == 0 else ([], None)
    banner_gpus, banner_driver, cuda = (
        parse_banner(banner.stdout) if banner.returncode == 0 else ([], None, None)
    )
    if not gpus:
        gpus = banner_gpus
    driver = driver or banner_driver
    error = None
    if not gpus:
        message = _first_line(query.stderr or query.stdout) or _first_line(banner.stderr or banner.stdout)
        error = message or f"nvidia-smi exited with code {query.returncode}"
    return GpuReport(
        gpus=tuple(gpus), driver_version=driver, cuda_version=cuda, nvidia_smi=smi, error=error, raw=raw
    )
