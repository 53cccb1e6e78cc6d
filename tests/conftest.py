"""Shared fixtures: tiny offline models saved the way users drop them into ``models/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models/`` with a tiny SD1 single file (+yaml), the same model as a diffusers folder,
    a tiny SDXL single file and a tiny SD1 inpainting single file."""
    from tests.tiny_models import save_diffusers_folder, save_single_file, tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    checkpoints = root / "Stable-diffusion"
    sd1 = tiny_pipeline("sd1", seed=0)
    save_single_file(sd1, checkpoints / "tiny-sd1.safetensors", "sd1")
    save_diffusers_folder(sd1, checkpoints / "tiny-sd1-diffusers")
    save_single_file(tiny_pipeline("sdxl", seed=0), checkpoints / "tiny-sdxl.safetensors", "sdxl")
    save_single_file(
        tiny_pipeline("sd1", inpainting=True, seed=0), checkpoints / "tiny-sd1-inpaint.safetensors", "sd1"
    )
    save_tiny_upscaler(root / "ESRGAN" / "2x-tiny-compact.safetensors")
    return root


def save_tiny_upscaler(path: Path) -> Path:
    """A Real-ESRGAN Compact 2x upscaler with random weights (spandrel identifies it)."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def studio(tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Services over the tiny models, outputs in a temp folder (shared: loading is the slow part)."""
    from app.services import StudioServices
    from app.settings import StudioSettings

    work = tmp_path_factory.mktemp("studio")
    settings = StudioSettings(
        models_dir=tiny_models_root,
        data_dir=work / "data",
        outputs_dir=work / "outputs",
        default_checkpoint="tiny-sd1",
        checkpoints_in_ram=4,
        in_process_workers=True,  # one in-process worker sharing studio.engine; worker processes
        device_ids=["cpu"],  # are tested in tests/test_workers.py
    )
    return StudioServices.create(settings)
