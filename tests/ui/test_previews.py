"""Live previews: A1111's cheap latent->RGB map, and TAESD from models/VAE-approx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generation.previews import LatentPreviewer, cheap_preview, taesd_state_dict_to_diffusers


def _pixel(image, x: int = 0, y: int = 0) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def test_cheap_preview_is_the_linear_map_at_full_size() -> None:
    latents = torch.zeros(1, 4, 8, 8)
    assert _pixel(cheap_preview(latents)) == (128, 128, 128)  # 0 -> mid grey
    latents[0, 0] = 1.0  # first channel only: its row of coefficients
    image = cheap_preview(latents)
    assert image.size == (64, 64)
    assert _pixel(image, 10, 10) == (165, 154, 154)  # ((0.298, 0.207, 0.208) + 1) * 127.5
    assert _pixel(cheap_preview(latents, sdxl=True), 10, 10) == (171, 181, 184)


def test_cheap_preview_shows_a_batch_side_by_side_and_skips_other_latent_shapes() -> None:
    assert cheap_preview(torch.zeros(3, 4, 8, 8)).size == (192, 64)
    assert cheap_preview(torch.zeros(1, 16, 8, 8)) is None


def _tiny_taesd(seed: int):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny().eval()


def _save_a1111_decoder(model, path: Path) -> None:
    """TAESD's original decoder layout: ``nn.Sequential`` with a clamp at index 0."""
    from safetensors.torch import save_file

    state = {
        f"{int(key.split('.')[1]) + 1}.{key.split('.', 2)[2]}": value.contiguous()
        for key, value in model.decoder.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def test_taesd_decoder_files_in_a1111_layout_are_used(tmp_path: Path) -> None:
    folder = tmp_path / "VAE-approx"
    model = _tiny_taesd(seed=0)
    _save_a1111_decoder(model, folder / "taesd_decoder.safetensors")
    previewer = LatentPreviewer(folder)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ((model.decode(latents).sample[0].clamp(-1, 1) + 1) * 127.5).round().byte()
    image = previewer.render(latents, mode="taesd")
    assert image.size == (64, 64)
    assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), expected)
    assert previewer.render(latents, mode="auto") == image
    assert previewer.render(latents, mode="cheap") == cheap_preview(latents)
    # no SDXL weights: SDXL jobs fall back to the cheap map
    assert previewer.render(latents, sdxl=True, mode="auto") == cheap_preview(latents, sdxl=True)
    assert previewer.render(latents, mode="none") is None


def test_taesd_key_conversion_rejects_foreign_files() -> None:
    with pytest.raises(ValueError, match="unexpected key"):
        taesd_state_dict_to_diffusers({"encoder.weight": torch.zeros(1), "conv.weight": torch.zeros(1)})
    converted = taesd_state_dict_to_diffusers({"decoder.layers.0.weight": torch.zeros(1)})
    assert list(converted) == ["layers.0.weight"]


def test_broken_taesd_weights_fall_back_to_cheap(tmp_path: Path) -> None:
    folder = tmp_path / "VAE-approx"
    folder.mkdir()
    (folder / "taesd_decoder.safetensors").write_bytes(b"not a safetensors file")
    latents = torch.zeros(1, 4, 8, 8)
    assert LatentPreviewer(folder).render(latents, mode="auto") == cheap_preview(latents)
