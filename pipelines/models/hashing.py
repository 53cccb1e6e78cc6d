"""Lazy, cached sha256 of model files (A1111's ``[hash]`` is the first 10 hex digits).

Hashing a 2-7 GB checkpoint takes seconds, so it is never done while listing: it happens when
a model is loaded or a user asks, and the result is remembered in a JSON cache keyed by path,
size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

SHORT_HASH_LENGTH = 10
_CHUNK = 1024 * 1024


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_folder(folder: Path) -> str:
    """A diffusers folder's identity: the hash of its weight and config files' hashes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        digest.update(str(file.relative_to(folder)).encode())
        digest.update(sha256_of_file(file).encode())
    return digest.hexdigest()


class HashCache:
    """Remembers file hashes across runs in one JSON file (thread-safe, written atomically)."""

    def __init__(self, cache_file: Path | None) -> None:
        self._file = cache_file
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] | None = None
        self._file_stamp: tuple[int, float] | None = None

    def _load(self) -> dict[str, dict[str, object]]:
        """The entries, read again when another process (a worker) has rewritten the file since."""
        stamp = self._current_file_stamp()
        if self._entries is None or (stamp is not None and stamp != self._file_stamp):
            self._file_stamp = stamp
            self._entries = {}
            if self._file is not None and self._file.is_file():
                try:
                    data = json.loads(self._file.read_text(encoding="utf-8"))
                    if isinstance(data, dict):
                        self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
                except (OSError, ValueError):
                    self._entries = {}
        return self._entries

    def _current_file_stamp(self) -> tuple[int, float] | None:
        if self._file is None:
            return None
        try:
            stat = self._file.stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime

    @staticmethod
    def _stamp(path: Path) -> tuple[int, float]:
        stat = path.stat()
        if path.is_dir():
            newest = max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=stat.st_mtime)
            return 0, newest
        return stat.st_size, stat.st_mtime

    def cached(self, path: Path) -> str | None:
        """The full sha256 if known and the file has not changed since, else None."""
        key = str(path.resolve())
        with self._lock:
            entry = self._load().get(key)
        if not entry:
            return None
        try:
            size, mtime = self._stamp(path)
        except OSError:
            return None
        if entry.get("size") == size and entry.get("mtime") == mtime:
            value = entry.get("sha256")
            return str(value) if value else None
        return None

    def sha256(self, path: Path) -> str:
        """Compute (or recall) the file's sha256."""
        known = self.cached(path)
        if known:
            return known
        size, mtime = self._stamp(path)
        value = sha256_of_folder(path) if path.is_dir() else sha256_of_file(path)
        with self._lock:
            self._load()[str(path.resolve())] = {"size": size, "mtime": mtime, "sha256": value}
            self._save()
            self._file_stamp = self._current_file_stamp()
        return value

    def _save(self) -> None:
        if self._file is None or self._entries is None:
            return
        self._file.parent.mkdir(parents=True, exist_ok=True)
        temp = self._file.with_name(f".{self._file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temp.write_text(json.dumps(self._entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temp, self._file)
