"""``nvidia-smi`` outputs of real cards and drivers, as the installer and doctor tests feed them.

Each case has the one-line-per-GPU query output (``--query-gpu=name,memory.total,driver_version,
compute_cap --format=csv,noheader``) and the plain ``nvidia-smi`` banner with its "CUDA Version".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmiCase:
    label: str
    query: str
    banner: str


def _banner(driver: str, cuda: str, name: str, used: int, total: int, *, windows: bool) -> str:
    mode = "WDDM" if windows else " Off"
    return f"""Tue Sep 30 10:12:03 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver:<22} Driver Version: {driver:<14} CUDA Version: {cuda:<9}|
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                  Driver-Model | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  {name:<30} {mode}  |   00000000:01:00.0  On |                  N/A |
|  0%   41C    P8             18W /  450W |    {used:>5}MiB / {total:>5}MiB |      3%      Default |
|                                         |                        |                  N/A |
+-----------------------------------------+------------------------+----------------------+
"""


# Driver 470 (CUDA 11.4) prints the older, narrower table and cuts long names.
OLD_DRIVER_BANNER = """Mon Jan  9 08:00:00 2023
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.182.03   Driver Version: 470.182.03   CUDA Version: 11.4     |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|                               |                      |               MIG M. |
|===============================+======================+======================|
|   0  NVIDIA GeForce ...  Off  | 00000000:01:00.0  On |                  N/A |
| 30%   40C    P8    11W / 160W |    300MiB /  5926MiB |      1%      Default |
|                               |                      |                  N/A |
+-------------------------------+----------------------+----------------------+
"""

RTX_2060_WINDOWS = SmiCase(
    "RTX 2060, Windows driver 537.58",
    "NVIDIA GeForce RTX 2060, 6144 MiB, 537.58, 7.5\n",
    _banner("537.58", "12.2", "NVIDIA GeForce RTX 2060", 512, 6144, windows=True),
)
RTX_3090_LINUX = SmiCase(
    "RTX 3090, Linux driver 550.120",
    "NVIDIA GeForce RTX 3090, 24576 MiB, 550.120, 8.6\n",
    _banner("550.120", "12.4", "NVIDIA GeForce RTX 3090", 1, 24576, windows=False),
)
RTX_4090_WINDOWS = SmiCase(
    "RTX 4090, Windows driver 572.16",
    "NVIDIA GeForce RTX 4090, 24564 MiB, 572.16, 8.9\n",
    _banner("572.16", "12.8", "NVIDIA GeForce RTX 4090", 1210, 24564, windows=True),
)
RTX_4090_LINUX = SmiCase(
    "RTX 4090, Linux driver 572.16",
    "NVIDIA GeForce RTX 4090, 24564 MiB, 572.16, 8.9\n",
    _banner("572.16", "12.8", "NVIDIA GeForce RTX 4090", 15, 24564, windows=False),
)
RTX_5090_LINUX_570 = SmiCase(
    "RTX 5090, Linux driver 570.86.15",
    "NVIDIA GeForce RTX 5090, 32607 MiB, 570.86.15, 12.0\n",
    _banner("570.86.15", "12.8", "NVIDIA GeForce RTX 5090", 1021, 32607, windows=False),
)
RTX_5090_LINUX_580 = SmiCase(
    "RTX 5090, Linux driver 580.65.06",
    "NVIDIA GeForce RTX 5090, 32607 MiB, 580.65.06, 12.0\n",
    _banner("580.65.06", "13.0", "NVIDIA GeForce RTX 5090", 1021, 32607, windows=False),
)
RTX_4060_LAPTOP_WINDOWS = SmiCase(
    "RTX 4060 Laptop GPU, Windows driver 566.36",
    "NVIDIA GeForce RTX 4060 Laptop GPU, 8188 MiB, 566.36, 8.9\n",
    _banner("566.36", "12.7", "NVIDIA GeForce RTX 4060 ...", 0, 8188, windows=True),
)
RTX_4070_LINUX = SmiCase(
    "RTX 4070, Linux driver 560.35.03",
    "NVIDIA GeForce RTX 4070, 12282 MiB, 560.35.03, 8.9\n",
    _banner("560.35.03", "12.6", "NVIDIA GeForce RTX 4070", 200, 12282, windows=False),
)
GTX_1660_OLD_DRIVER = SmiCase(
    "GTX 1660 SUPER, Linux driver 470.182.03 (too old)",
    "NVIDIA GeForce GTX 1660 SUPER, 5926 MiB, 470.182.03\n",
    OLD_DRIVER_BANNER,
)
RTX_2060_OLD_DRIVER = SmiCase(
    "RTX 2060, Linux driver 470.182.03 (too old)",
    "NVIDIA GeForce RTX 2060, 5926 MiB, 470.182.03\n",
    OLD_DRIVER_BANNER,
)

DRIVER_NOT_LOADED = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
    "latest NVIDIA driver is installed and running.\n"
)


def fake_nvidia_smi_script(case: SmiCase) -> str:
    """A POSIX shell script that answers like ``nvidia-smi`` on ``case``'s machine (shell builtins
    only, so it works with a PATH that holds nothing but itself)."""
    assert "'" not in case.query + case.banner
    return (
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --query-gpu=*) printf '%s\\n' '{case.query.rstrip()}' ;;\n"
        f"  *) printf '%s\\n' '{case.banner.rstrip()}' ;;\n"
        "esac\n"
    )
