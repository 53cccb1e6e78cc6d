"""Upscalers: built-ins, spandrel models saved the way users drop them in, tiling, errors.

Models are spandrel's own architectures with tiny configs and seeded random weights; images are
small so each model run takes a fraction of a second on CPU.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import (
    ImageModelLoadError,
    ModelNotFoundError,
    StudioError,
    UpscalerFileMissingError,
    UpscalerNotFoundError,
)
from pipelines.postprocess.tiling import axis_weights, pil_to_tensor, tile_starts
from pipelines.postprocess.upscalers import (
    UPSCALER_BUILTINS,
    UpscalerCache,
    find_upscaler,
    list_upscalers,
    load_image_model,
    run_image_model_tiled,
    scale_from_name,
    scale_from_safetensors_header,
    upscale,
    upscaler_catalogue,
)


def _compact(scale: int, seed: int) -> dict[str, torch.Tensor]:
    """Real-ESRGAN Compact: 4 convolutions, so a receptive field of 4 input pixels each side."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale).state_dict()


def _esrgan(scale: int, seed: int, **kwargs: int) -> dict[str, torch.Tensor]:
    """ESRGAN (RRDBNet, old key layout) with one block and 8 filters: spandrel still detects it."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale, **kwargs).state_dict()


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    esrgan, real, swinir = root / "ESRGAN", root / "RealESRGAN", root / "SwinIR"
    for folder in (esrgan, real, swinir):
        folder.mkdir()
    save_file(_compact(2, seed=0), esrgan / "2x-compact.safetensors")
    save_file(_esrgan(4, seed=1), esrgan / "tiny-esrgan.safetensors")
    # A Real-ESRGAN-style training checkpoint: weights wrapped in "params_ema", pickled .pth.
    torch.save({"params_ema": _esrgan(2, seed=2)}, real / "RealESRGAN_x2tiny.pth")
    # The same name in two formats: the safetensors one is listed, the .pth hidden.
    save_file(_compact(2, seed=3), real / "dup.safetensors")
    torch.save(_compact(2, seed=3), real / "dup.pth")
    # Same name as a model in ESRGAN/: listed with its folder as prefix.
    save_file(_compact(2, seed=4), swinir / "2x-compact.safetensors")
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, esrgan / "not-a-model.safetensors")
    (esrgan / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    return root


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8))


# listing ---------------------------------------------------------------------------------------
def test_listing_has_builtins_then_models_with_scales(models_root: Path) -> None:
    infos = {info.name: info for info in list_upscalers(models_root)}
    assert [info.name for info in list_upscalers(models_root)][:3] == list(UPSCALER_BUILTINS)
    assert infos["Lanczos"].path is None and infos["Lanczos"].kind == "builtin"
    assert infos["2x-compact"].scale == 2 and infos["2x-compact"].kind == "ESRGAN"
    assert infos["tiny-esrgan"].scale == 4  # from the safetensors header, not the name
    assert infos["RealESRGAN_x2tiny"].scale == 2  # .pth: from the name
    assert infos["dup"].path is not None and infos["dup"].path.suffix == ".safetensors"
    assert infos["SwinIR/2x-compact"].kind == "SwinIR"


def test_catalogue_has_a1111_fields(models_root: Path) -> None:
    catalogue = {entry["name"]: entry for entry in upscaler_catalogue(models_root)}
    assert set(catalogue["None"]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert catalogue["None"]["model_path"] is None
    assert catalogue["tiny-esrgan"]["model_path"].endswith("tiny-esrgan.safetensors")
    assert catalogue["tiny-esrgan"]["scale"] == 4.0


@pytest.mark.parametrize(
    ("name", "expected"),
    [("4x-UltraSharp", 4), ("RealESRGAN_x4plus_anime_6B", 4), ("2xLexicaRRDBNet", 2), ("DAT_x3", 3)],
)
def test_scale_from_name(name: str, expected: int) -> None:
    assert scale_from_name(name) == expected


def test_scale_from_name_unknown() -> None:
    assert scale_from_name("UltraSharp") is None


def test_header_scale_matches_spandrel_for_pixel_unshuffle_model(tmp_path: Path) -> None:
    """Real-ESRGAN x2 models unshuffle the input (12 input channels) and run a 4x body."""
    path = tmp_path / "unshuffle.safetensors"
    save_file(_esrgan(4, seed=5, in_nc=12, out_nc=3, shuffle_factor=2), path)
    assert scale_from_safetensors_header(path) == load_image_model(path).scale == 2


def test_find_accepts_file_name_stem_and_path(models_root: Path) -> None:
    assert find_upscaler(models_root, "tiny-esrgan.safetensors").name == "tiny-esrgan"
    assert find_upscaler(models_root, "TINY-ESRGAN").name == "tiny-esrgan"
    path = models_root / "ESRGAN" / "2x-compact.safetensors"
    assert find_upscaler(models_root, str(path)).path == path


# built-ins -------------------------------------------------------------------------------------
def test_builtins_need_no_model(tmp_path: Path, image: Image.Image) -> None:
    lanczos = upscale(image, upscaler="Lanczos", scale=2, cache=None, models_root=tmp_path)
    nearest = upscale(image, upscaler="Nearest", scale=3, cache=None, models_root=tmp_path)
    assert lanczos.size == (90, 74)
    assert np.array_equal(np.asarray(nearest), np.asarray(image.resize((135, 111), Image.Resampling.NEAREST)))
    assert upscale(image, upscaler="None", cache=None, models_root=tmp_path).size == image.size


def test_builtin_without_size_is_an_error(tmp_path: Path, image: Image.Image) -> None:
    with pytest.raises(StudioError, match="needs an upscale factor or a target size"):
        upscale(image, upscaler="Lanczos", cache=None, models_root=tmp_path)


def test_target_size_crops_to_fit_or_stretches(tmp_path: Path, image: Image.Image) -> None:
    cropped = upscale(image, upscaler="Lanczos", target_size=(100, 40), cache=None, models_root=tmp_path)
    stretched = upscale(
        image, upscaler="Lanczos", target_size=(100, 40), crop=False, cache=None, models_root=tmp_path
    )
    assert cropped.size == stretched.size == (100, 40)
    # crop-to-fit keeps the aspect ratio, so it differs from the stretched image
    assert not np.array_equal(np.asarray(cropped), np.asarray(stretched))


def test_alpha_channel_is_kept(tmp_path: Path, image: Image.Image) -> None:
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    result = upscale(rgba, upscaler="Lanczos", scale=2, cache=None, models_root=tmp_path)
    assert result.mode == "RGBA" and result.size == (90, 74)
    assert result.getchannel("A").getextrema()[1] > 200


# model upscalers -------------------------------------------------------------------------------
def test_model_upscale_by_factor(models_root: Path, image: Image.Image) -> None:
    cache = UpscalerCache()
    by_two = upscale(image, upscaler="2x-compact", scale=2, cache=cache, models_root=models_root)
    native = upscale(image, upscaler="2x-compact", cache=cache, models_root=models_root)
    assert by_two.size == native.size == (90, 74)
    assert np.array_equal(np.asarray(by_two), np.asarray(native))
    # a 4x model asked for 2x runs once, then Lanczos brings it down
    assert upscale(image, upscaler="tiny-esrgan", scale=2, cache=cache, models_root=models_root).size == (
        90,
        74,
    )


def test_model_upscale_to_exact_size(models_root: Path, image: Image.Image) -> None:
    result = upscale(
        image, upscaler="RealESRGAN_x2tiny", target_size=(101, 57), cache=None, models_root=models_root
    )
    assert result.size == (101, 57)


def test_scale_above_native_runs_the_model_again(models_root: Path, image: Image.Image) -> None:
    passes: list[tuple[int, int]] = []
    result = upscale(
        image,
        upscaler="2x-compact",
        scale=3,
        tile=0,
        cache=UpscalerCache(),
        models_root=models_root,
        progress=lambda done, total: passes.append((done, total)),
    )
    assert result.size == (135, 111)
    assert passes == [(1, 1), (1, 1)]  # 2x twice (4x), then Lanczos down to 3x


def test_tiled_equals_untiled_for_small_receptive_field(models_root: Path) -> None:
    descriptor = load_image_model(models_root / "ESRGAN" / "2x-compact.safetensors")
    rng = np.random.default_rng(1)
    tensor = pil_to_tensor(Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)))
    untiled = run_image_model_tiled(descriptor, tensor, tile=0)
    tiles: list[int] = []
    tiled = run_image_model_tiled(
        descriptor, tensor, tile=32, tile_overlap=16, progress=lambda done, total: tiles.append(total)
    )
    assert tiled.shape == untiled.shape == (1, 3, 140, 180)
    assert tiles[-1] > 4  # really tiled
    assert float((tiled - untiled).abs().max()) < 1e-5


def test_tiled_is_close_for_esrgan(models_root: Path) -> None:
    """RRDB sees further than the guard band; the feathered blend keeps the difference small."""
    descriptor = load_image_model(models_root / "ESRGAN" / "tiny-esrgan.safetensors")
    rng = np.random.default_rng(2)
    tensor = pil_to_tensor(Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    untiled = run_image_model_tiled(descriptor, tensor, tile=0)
    tiled = run_image_model_tiled(descriptor, tensor, tile=24, tile_overlap=12)
    assert tiled.shape == untiled.shape == (1, 3, 160, 192)
    assert float((tiled - untiled).abs().mean()) < 0.01


def test_tile_zero_and_big_tile_are_untiled(models_root: Path, image: Image.Image) -> None:
    cache = UpscalerCache()
    untiled = upscale(image, upscaler="2x-compact", tile=0, cache=cache, models_root=models_root)
    one_tile = upscale(image, upscaler="2x-compact", tile=512, cache=cache, models_root=models_root)
    assert np.array_equal(np.asarray(untiled), np.asarray(one_tile))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 400),
    tile=st.integers(16, 128),
    overlap=st.integers(0, 64),
    scale=st.sampled_from([1, 2, 4]),
)
def test_tiles_cover_and_weights_sum_to_one(size: int, tile: int, overlap: int, scale: int) -> None:
    overlap = min(overlap, tile // 2)
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + min(tile, size) == size
    for previous, current in itertools.pairwise(starts):
        assert previous + tile - current >= overlap - 1  # rounding may cost a pixel
    total = np.zeros(size * scale)
    for start, weight in zip(starts, axis_weights(size, tile, starts, scale, overlap), strict=True):
        total[start * scale : start * scale + weight.shape[0]] += weight.numpy()
    assert np.allclose(total, 1.0, atol=1e-5)


# cache -----------------------------------------------------------------------------------------
def test_cache_reuses_and_evicts(models_root: Path) -> None:
    cache = UpscalerCache(max_models=1)
    first = cache.get(models_root / "ESRGAN" / "2x-compact.safetensors", device="cpu")
    assert cache.get(models_root / "ESRGAN" / "2x-compact.safetensors", device="cpu") is first
    cache.get(models_root / "RealESRGAN" / "dup.safetensors", device="cpu")
    assert len(cache) == 1
    assert cache.get(models_root / "ESRGAN" / "2x-compact.safetensors", device="cpu") is not first
    assert first.dtype == torch.float32 and not first.model.training


# errors ----------------------------------------------------------------------------------------
def test_unknown_upscaler_lists_choices(models_root: Path, image: Image.Image) -> None:
    with pytest.raises(UpscalerNotFoundError, match="Unknown upscaler 'R-ESRGAN 4x\\+'") as caught:
        upscale(image, upscaler="R-ESRGAN 4x+", scale=2, cache=None, models_root=models_root)
    assert "Lanczos" in str(caught.value) and "tiny-esrgan" in str(caught.value)
    assert isinstance(caught.value, ModelNotFoundError)


def test_non_model_safetensors_names_the_file(models_root: Path, image: Image.Image) -> None:
    with pytest.raises(
        ImageModelLoadError, match=r"not-a-model\.safetensors: spandrel .* does not recognise"
    ):
        upscale(image, upscaler="not-a-model", scale=2, cache=None, models_root=models_root)


def test_garbage_safetensors_names_the_file(models_root: Path, image: Image.Image) -> None:
    with pytest.raises(ImageModelLoadError, match=r"garbage\.safetensors"):
        upscale(image, upscaler="garbage", scale=2, cache=None, models_root=models_root)


def test_missing_file_is_reported(tmp_path: Path, image: Image.Image) -> None:
    missing = tmp_path / "ESRGAN" / "gone.safetensors"
    with pytest.raises(UpscalerFileMissingError, match=r"gone\.safetensors does not exist"):
        upscale(image, upscaler=str(missing), scale=2, cache=None, models_root=tmp_path)
    with pytest.raises(UpscalerFileMissingError):
        UpscalerCache().get(missing)


class _NotATensor:
    """Anything that is not a tensor makes ``torch.load(weights_only=True)`` refuse the file."""


def test_pth_with_pickled_objects_is_refused(tmp_path: Path, image: Image.Image) -> None:
    (tmp_path / "ESRGAN").mkdir()
    torch.save({"params_ema": _compact(2, seed=0), "extra": _NotATensor()}, tmp_path / "ESRGAN" / "evil.pth")
    with pytest.raises(ImageModelLoadError, match="weights_only"):
        upscale(image, upscaler="evil", scale=2, cache=None, models_root=tmp_path)


def test_bad_requests(models_root: Path, image: Image.Image) -> None:
    with pytest.raises(StudioError, match="not both"):
        upscale(image, upscaler="Lanczos", scale=2, target_size=(9, 9), cache=None, models_root=models_root)
    with pytest.raises(StudioError, match="positive"):
        upscale(image, upscaler="Lanczos", scale=-1, cache=None, models_root=models_root)
    with pytest.raises(StudioError, match="Tile size 8 is too small"):
        upscale(image, upscaler="2x-compact", tile=8, cache=None, models_root=models_root)
