"""Owns loaded checkpoints: an LRU cache in RAM with a pin while a job uses a model.

Loading a checkpoint takes seconds to minutes, so up to ``max_loaded`` pipelines stay in memory
and switching back is instant. A model being used by a job is pinned and never evicted. A new
model is fully loaded before anything is evicted, so a corrupt file leaves the previous model
loaded and usable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.models.checkpoint_loader import LoadedCheckpoint, load_checkpoint
from pipelines.models.registry import ModelEntry, ModelRegistry

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]


@dataclass(frozen=True)
class _Key:
    path: str
    mtime: float


class ModelManager:
    """Load, cache and hand out pipelines; one instance per studio process (injected, not global)."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_loaded: int = 2,
        dtype: torch.dtype | None = None,
        default_checkpoint: str | None = None,
        loader: Callable[..., Any] = load_checkpoint,
    ) -> None:
        self.registry = registry
        self.max_loaded = max(1, max_loaded)
        self.dtype = dtype
        self.default_checkpoint = default_checkpoint
        self._loader = loader
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[_Key, LoadedCheckpoint] = OrderedDict()
        self._pins: dict[_Key, int] = {}
        self._current: _Key | None = None

    # ------------------------------------------------------------------------------------------
    def resolve(self, query: str | None) -> ModelEntry:
        """The entry a job asks for; without a name, the current model, else the default."""
        if query:
            return self.registry.find("checkpoint", query)
        with self._lock:
            if self._current is not None and self._current in self._cache:
                return self._cache[self._current].entry
        return self.registry.default_checkpoint(self.default_checkpoint)

    @property
    def current(self) -> LoadedCheckpoint | None:
        with self._lock:
            return self._cache.get(self._current) if self._current else None

    def loaded(self) -> list[LoadedCheckpoint]:
        with self._lock:
            return list(self._cache.values())

    def load(self, query: str | None = None, *, status: StatusCallback | None = None) -> LoadedCheckpoint:
        """Load (or recall from cache) a checkpoint and make it current."""
        entry = self.resolve(query)
        key = _Key(str(entry.path), entry.mtime)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._current = key
                return hit
        with self._load_lock:  # one load at a time: two 4 GB loads at once exhaust RAM
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._current = key
                    return hit
            if status:
                status(f"Loading model {entry.filename}...")
            started = time.perf_counter()
            family = self.registry.family(entry)
            sha256 = self.registry.hashes.sha256(entry.path)
            pipe = self._loader(entry, family=family, dtype=self.dtype)
            loaded = LoadedCheckpoint(
                entry=entry,
                family=family,
                pipe=pipe,
                sha256=sha256,
                load_seconds=time.perf_counter() - started,
            )
            log.info("loaded %s (%s) in %.1fs", entry.filename, family.label, loaded.load_seconds)
            with self._lock:
                self._cache[key] = loaded
                self._cache.move_to_end(key)
                self._current = key
                self._evict()
            return loaded

    @contextmanager
    def use(
        self, query: str | None = None, *, status: StatusCallback | None = None, restore_current: bool = False
    ) -> Iterator[LoadedCheckpoint]:
        """Pin a model for the duration of a job so eviction cannot pull it away.

        ``restore_current`` makes a per-job model choice temporary (A1111's
        ``override_settings_restore_afterwards``): the model that was current before the job is
        current again afterwards; the job's model stays cached for a quick switch back.
        """
        with self._lock:
            previous = self._current
        loaded = self.load(query, status=status)
        key = _Key(str(loaded.entry.path), loaded.entry.mtime)
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield loaded
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
                if restore_current and previous is not None and previous in self._cache:
                    self._current = previous
                self._evict()

    def unload_all(self) -> None:
        with self._lock:
            for key in [k for k in self._cache if k not in self._pins]:
                del self._cache[key]
            if self._current not in self._cache:
                self._current = None

    def _evict(self) -> None:
        while len(self._cache) > self.max_loaded:
            victim = next((k for k in self._cache if k not in self._pins and k != self._current), None)
            if victim is None:
                return
            log.info("evicting %s from the model cache", self._cache[victim].entry.filename)
            del self._cache[victim]
