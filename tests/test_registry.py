"""Registry listing, name resolution, family detection from headers, lazy hashes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipelines.errors import CheckpointLoadError, ModelNotFoundError, NoModelsError
from pipelines.models.families import ModelFamily, UnknownFamilyError, detect_family
from pipelines.models.hashing import HashCache
from pipelines.models.registry import ModelPaths, ModelRegistry
from pipelines.models.safetensors_header import read_safetensors_header

SD1_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}


def write_fake_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], *, truncate: int = 0) -> Path:
    """A structurally valid safetensors file with zero-filled F16 tensors (tiny shapes only)."""
    header: dict[str, object] = {}
    offset = 0
    for key, shape in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)
    return path


def small(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Same keys, tiny shapes (first two dims kept meaningful for channel checks)."""
    return {k: tuple(min(d, 9) for d in v) for k, v in shapes.items()}


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(ModelPaths(models_root=tmp_path / "models"), HashCache(tmp_path / "hashes.json"))


def test_detect_families_from_keys() -> None:
    assert detect_family(SD1_KEYS) == ModelFamily("sd1")
    inpaint = {**SD1_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert detect_family(inpaint) == ModelFamily("sd1", "inpaint")
    sd2 = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    }
    assert detect_family(sd2).prediction == "v_prediction"
    assert detect_family(sd2).config_name == "sd2"
    eps_yaml = {"model": {"params": {"parameterization": "eps"}}}
    assert detect_family(sd2, original_config=eps_yaml).config_name == "sd2-base"
    sdxl = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    }
    assert detect_family(sdxl) == ModelFamily("sdxl")
    assert detect_family({**sdxl, "v_pred": ()}).prediction == "v_prediction"
    v_yaml = {"model": {"params": {"parameterization": "v"}}}
    assert detect_family(SD1_KEYS, original_config=v_yaml).prediction == "v_prediction"


def test_unknown_family_message_points_to_the_right_folder() -> None:
    with pytest.raises(UnknownFamilyError, match="models/Lora"):
        detect_family({"lora_unet_down_blocks_0.alpha": ()}, name="thing.safetensors")


def test_listing_shows_family_size_and_lazy_hash(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    write_fake_safetensors(folder / "alpha.safetensors", small(SD1_KEYS))
    write_fake_safetensors(folder / "sub" / "beta.safetensors", small(SD1_KEYS))
    (folder / "notes.txt").write_text("not a model")
    entries = registry.checkpoints()
    assert [e.name for e in entries] == ["alpha", "sub/beta"]
    info = registry.describe(entries[0])
    assert info["family"] == "SD1.x"
    assert info["hash"] is None  # not computed while listing
    short = registry.short_hash(entries[0], compute=True)
    assert short is not None and len(short) == 10
    assert registry.describe(entries[0])["title"] == f"alpha.safetensors [{short}]"
    # the cache survives a new registry (another process)
    again = ModelRegistry(registry.paths, HashCache(tmp_path / "hashes.json"))
    assert again.short_hash(again.checkpoints()[0]) == short


def test_find_accepts_a1111_spellings(registry: ModelRegistry, tmp_path: Path) -> None:
    folder = tmp_path / "models" / "Stable-diffusion"
    write_fake_safetensors(folder / "alpha.safetensors", small(SD1_KEYS))
    write_fake_safetensors(folder / "sub" / "beta.safetensors", small(SD1_KEYS))
    alpha = registry.find("checkpoint", "alpha")
    short = registry.short_hash(alpha, compute=True)
    for query in ("alpha", "alpha.safetensors", f"alpha.safetensors [{short}]", "ALPHA", short):
        assert registry.find("checkpoint", query).name == "alpha", query
    assert registry.find("checkpoint", "beta").name == "sub/beta"
    with pytest.raises(ModelNotFoundError, match=r"Available: alpha\.safetensors"):
        registry.find("checkpoint", "gamma")


def test_empty_folder_explains_how_to_download(registry: ModelRegistry) -> None:
    with pytest.raises(NoModelsError, match=r"launch\.py download"):
        registry.default_checkpoint()


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = write_fake_safetensors(tmp_path / "cut.safetensors", small(SD1_KEYS), truncate=10)
    with pytest.raises(CheckpointLoadError, match="truncated"):
        read_safetensors_header(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointLoadError, match="not a valid"):
        read_safetensors_header(garbage)


def test_hash_cache_notices_changed_files(tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "h.json")
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"one")
    first = cache.sha256(file)
    file.write_bytes(b"two!")
    assert cache.cached(file) is None
    assert cache.sha256(file) != first


def test_path_overrides(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    write_fake_safetensors(other / "x.safetensors", small(SD1_KEYS))
    registry = ModelRegistry(ModelPaths(models_root=tmp_path / "models", checkpoints=other))
    assert [e.name for e in registry.checkpoints()] == ["x"]
