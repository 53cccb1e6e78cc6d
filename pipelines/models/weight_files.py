"""Reading the tensors of a single weight file safely, with damage reported in plain words.

``.safetensors`` files are read directly (after their header is checked, which catches truncated
downloads); pickled ``.ckpt/.pt/.pth/.bin`` files only through ``torch.load(weights_only=True)``,
so a file that would need arbitrary unpickling (and could run code) is refused. Checkpoints, VAEs,
LoRAs, ControlNets and annotators are all read through here; torch and safetensors are imported
inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import CheckpointLoadError
from pipelines.models.safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
"""Weight-file suffixes that hold a pickle (read with ``weights_only=True``), not safetensors."""


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``.ckpt/.pt/.pth`` through ``torch.load(weights_only=True)`` only: a file that needs
    arbitrary unpickling (and could run code) is refused."""
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or isinstance(exc, pickle.UnpicklingError):
            raise CheckpointLoadError(
                f"{path.name}: refused to load: the pickle holds objects other than tensors, and "
                "loading it could run code. Use a .safetensors version of this model."
            ) from exc
        raise CheckpointLoadError(
            f"{path.name}: file is corrupt or truncated ({text}). Download it again."
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointLoadError(f"{path.name}: does not contain a state dict.")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint, with corruption reported in plain words."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickled_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)  # fails fast, with a clear message, on truncation
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointLoadError(f"{path.name}: file is corrupt ({exc}). Download it again.") from exc
