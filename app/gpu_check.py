"""At start: is there an NVIDIA GPU that this PyTorch cannot use? Said in the console and the UI header.

An artist whose RTX card sits idle while images take a minute each on the CPU should be told why, and
the one command that fixes it. ``nvidia-smi`` is asked first (no GPU: nothing else is done, and torch
is not imported at start-up); only with a GPU is torch imported to ask ``torch.cuda.is_available()``.
Generation keeps working on the CPU either way.
"""

from __future__ import annotations

import functools
import sys

from installer.gpu import GpuReport, detect_nvidia
from installer.torch_builds import gpu_unusable_message, reinstall_command


def notice_for(
    report: GpuReport, *, torch_version: str | None, torch_cuda: str | None, cuda_available: bool
) -> str | None:
    """The message for what ``nvidia-smi`` and torch said (None: nothing wrong)."""
    if cuda_available:
        return None
    if not report.has_gpu and report.error:
        return (
            f"nvidia-smi is installed but failed ({report.error}): the NVIDIA driver is not working, so "
            "images are rendered on the CPU. Reinstall or update the NVIDIA driver and restart the PC, then "
            f"run: {reinstall_command(sys.platform)}"
        )
    return gpu_unusable_message(
        report,
        sys.platform,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        cuda_available=cuda_available,
    )


@functools.lru_cache(maxsize=1)
def gpu_notice() -> str | None:
    """Why PyTorch cannot use this PC's NVIDIA GPU, with the fix; None when there is nothing to say.
    Computed once per process (it runs ``nvidia-smi``)."""
    report = detect_nvidia()
    if not report.has_gpu and not report.error:
        return None
    import torch

    return notice_for(
        report,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
    )
