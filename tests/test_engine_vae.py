"""Choosing a VAE from models/VAE per job (A1111's sd_vae), and clip skip / variation seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from contract.images import Txt2ImgRequest
from pipelines.errors import CheckpointLoadError
from pipelines.models.checkpoint_export import vae_to_ldm

BASE = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 2, "seed": 8, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def vae_files(tiny_models_root: Path) -> Path:
    from tests.tiny_models import tiny_pipeline

    folder = tiny_models_root / "VAE"
    folder.mkdir(exist_ok=True)
    other = tiny_pipeline("sd1", seed=5).vae  # same architecture, other weights
    save_file(vae_to_ldm(other.state_dict(), other.config, prefix=""), str(folder / "other.vae.safetensors"))
    xl = tiny_pipeline("sdxl", seed=5).vae
    xl_sd = {k: v for k, v in vae_to_ldm(xl.state_dict(), xl.config, prefix="").items() if "decoder" not in k}
    save_file(xl_sd, str(folder / "broken.safetensors"))
    return folder


def run(studio, **fields) -> np.ndarray:
    result = studio.engine.txt2img(Txt2ImgRequest(**{**BASE, **fields}))
    return np.array(result.images[0].image), result.images[0].infotext


def test_vae_override_changes_output_and_is_undone(studio, vae_files: Path) -> None:
    studio.registry.refresh("vae")
    own, _ = run(studio)
    swapped, text = run(studio, override_settings={"sd_vae": "other.vae.safetensors"})
    again, _ = run(studio, override_settings={"sd_vae": "Automatic"})
    assert not np.array_equal(own, swapped)
    assert np.array_equal(own, again)
    assert "VAE: other.vae.safetensors" in text and "VAE hash: " in text


def test_vae_for_another_architecture_is_refused(studio, vae_files: Path) -> None:
    studio.registry.refresh("vae")
    with pytest.raises(CheckpointLoadError, match="does not fit"):
        run(studio, override_settings={"sd_vae": "broken"})
    assert np.array_equal(run(studio)[0], run(studio)[0])


def test_clip_skip_and_variation_seed_change_the_image(studio) -> None:
    plain, _ = run(studio)
    assert not np.array_equal(plain, run(studio, clip_skip=2)[0])
    varied, text = run(studio, subseed=99, subseed_strength=0.5)
    assert not np.array_equal(plain, varied)
    assert "Variation seed: 99" in text
    assert np.array_equal(plain, run(studio, subseed=99, subseed_strength=0.0)[0])
