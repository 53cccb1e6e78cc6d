"""Free disk space, said in GB with the amount needed (standard library only)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

GB = 1000**3

# What a first install takes on disk, measured on wheels of the torch 2.x series (download in pip's
# cache + unpacked in .venv, plus headroom for pip's temporary files):
#   CUDA build of torch + torchvision: ~3 GB of wheels, ~5-6 GB unpacked (cuDNN, cuBLAS...);
#   CPU / macOS build: ~0.3 GB of wheels, ~1 GB unpacked;
#   the rest of requirements.txt (diffusers, transformers, gradio, opencv, scipy...): ~1.5 GB.
INSTALL_NEEDS_GB = {"cuda": 10.0, "default": 10.0, "cpu": 3.0, "rest": 2.5}
SKIP_ENV = "SDSTUDIO_SKIP_DISK_CHECK"

DiskUsage = Callable[[str], "shutil._ntuple_diskusage"]


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing parent (a folder not created yet is on its parent's disk)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def free_bytes(path: Path, disk_usage: DiskUsage = shutil.disk_usage) -> int | None:
    """Free bytes on the disk holding ``path``; None when the system cannot say (some network drives)."""
    try:
        return int(disk_usage(str(existing_parent(path))).free)
    except OSError:
        return None


def gb(num_bytes: float) -> str:
    """``12.3 GB`` (decimal GB, as Explorer's and ``df -H``'s numbers; close enough for "enough?")."""
    return f"{num_bytes / GB:.1f} GB"


def shortfall_message(
    path: Path, needed_bytes: int, what: str, *, disk_usage: DiskUsage = shutil.disk_usage
) -> str | None:
    """None when ``path``'s disk has ``needed_bytes`` free, else a message saying how much is needed,
    how much is free, and where."""
    free = free_bytes(path, disk_usage)
    if free is None or free >= needed_bytes:
        return None
    return (
        f"Not enough free disk space for {what}: about {gb(needed_bytes)} is needed on the disk holding "
        f"{existing_parent(path)}, and {gb(free)} is free. Free up {gb(needed_bytes - free)} or more and run "
        f"the same command again (set {SKIP_ENV}=1 to skip this check)."
    )
