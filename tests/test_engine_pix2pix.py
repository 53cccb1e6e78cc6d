"""instruct-pix2pix checkpoints (8-channel UNet): img2img with an image CFG scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.images import Img2ImgRequest, Txt2ImgRequest
from pipelines.errors import StudioError


@pytest.fixture(scope="module")
def pix2pix_studio(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from app.services import StudioServices
    from app.settings import StudioSettings
    from tests.tiny_models import _unet, save_single_file, tiny_pipeline

    root = tmp_path_factory.mktemp("pix2pix")
    base = tiny_pipeline("sd1", seed=0)
    import torch

    torch.manual_seed(1)
    edit = StableDiffusionInstructPix2PixPipeline(**{**base.components, "unet": _unet("sd1", 8)})
    save_single_file(edit, root / "models" / "Stable-diffusion" / "tiny-pix2pix.safetensors", "sd1")
    settings = StudioSettings(models_dir=root / "models", data_dir=root / "data", outputs_dir=root / "out")
    return StudioServices.create(settings)


def test_image_cfg_scale_steers_the_edit(pix2pix_studio, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    common = {
        "prompt": "make it snowy",
        "init_images": [str(source)],
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
    }
    entry = pix2pix_studio.registry.find("checkpoint", "tiny-pix2pix")
    assert pix2pix_studio.registry.family(entry).variant == "edit"
    low = pix2pix_studio.engine.run(Img2ImgRequest(**common, image_cfg_scale=1.0))
    high = pix2pix_studio.engine.run(Img2ImgRequest(**common, image_cfg_scale=4.0))
    assert not np.array_equal(np.array(low.images[0].image), np.array(high.images[0].image))
    assert "Image CFG scale: 4" in high.images[0].infotext
    with pytest.raises(StudioError, match="instruct-pix2pix"):
        pix2pix_studio.engine.run(Txt2ImgRequest(prompt="x", width=64, height=64, steps=2))
