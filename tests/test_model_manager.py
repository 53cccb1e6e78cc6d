"""Model cache: LRU eviction, pinning, and a bad file leaving the previous model loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.errors import CheckpointLoadError
from pipelines.models.hashing import HashCache
from pipelines.models.model_manager import ModelManager
from pipelines.models.registry import ModelPaths, ModelRegistry
from tests.test_registry import SD1_KEYS, small, write_fake_safetensors


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, entry: Any, *, family: Any, dtype: Any) -> object:
        self.calls.append(entry.name)
        if entry.name == "broken":
            raise CheckpointLoadError("broken.safetensors: file is corrupt")
        return object()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ModelManager, CountingLoader]:
    folder = tmp_path / "models" / "Stable-diffusion"
    for name in ("a", "b", "c", "broken"):
        write_fake_safetensors(folder / f"{name}.safetensors", small(SD1_KEYS))
    registry = ModelRegistry(ModelPaths(models_root=tmp_path / "models"), HashCache(None))
    loader = CountingLoader()
    return ModelManager(registry, max_loaded=2, loader=loader), loader


def test_switching_back_is_a_cache_hit(setup: tuple[ModelManager, CountingLoader]) -> None:
    manager, loader = setup
    first = manager.load("a")
    manager.load("b")
    assert manager.load("a") is first
    assert loader.calls == ["a", "b"]
    manager.load("c")  # evicts b (least recently used)
    assert sorted(m.entry.name for m in manager.loaded()) == ["a", "c"]


def test_default_is_current_model(setup: tuple[ModelManager, CountingLoader]) -> None:
    manager, _ = setup
    manager.load("b")
    assert manager.load(None).entry.name == "b"


def test_corrupt_file_keeps_previous_model(setup: tuple[ModelManager, CountingLoader]) -> None:
    manager, _ = setup
    manager.load("a")
    with pytest.raises(CheckpointLoadError):
        manager.load("broken")
    assert manager.current is not None and manager.current.entry.name == "a"


def test_pinned_model_is_not_evicted(setup: tuple[ModelManager, CountingLoader]) -> None:
    manager, _ = setup
    with manager.use("a"):
        manager.load("b")
        manager.load("c")
        assert "a" in {m.entry.name for m in manager.loaded()}
    assert len(manager.loaded()) == 2


def test_per_job_model_choice_can_be_temporary(setup: tuple[ModelManager, CountingLoader]) -> None:
    manager, loader = setup
    manager.load("a")
    with manager.use("b", restore_current=True) as loaded:
        assert loaded.entry.name == "b"
    assert manager.current.entry.name == "a"
    with manager.use("c"):
        pass
    assert manager.current.entry.name == "c"
    assert loader.calls == ["a", "b", "c"]
