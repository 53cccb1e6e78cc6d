"""The model registry: what the user has dropped into the model folders.

Folder names follow AUTOMATIC1111 (``models/Stable-diffusion``, ``models/VAE``, ``models/Lora``,
``models/ControlNet``, ``models/ESRGAN``, ``embeddings/``) so an existing A1111 install's
folders can be pointed at directly. Listing is cheap: it reads file names, sizes and
safetensors headers, never tensor data; hashes are computed lazily (see ``hashing``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.errors import ModelNotFoundError, NoModelsError
from pipelines.models.download import standard_download_command
from pipelines.models.families import ModelFamily, UnknownFamilyError, detect_diffusers_family, detect_family
from pipelines.models.hashing import SHORT_HASH_LENGTH, HashCache
from pipelines.models.safetensors_header import read_safetensors_header
from pipelines.models.weight_files import read_pickled_state_dict

ModelKind = Literal[
    "checkpoint",
    "vae",
    "lora",
    "controlnet",
    "upscaler",
    "embedding",
    "vae_approx",
    "sadtalker",
    "sd_upscaler",
]

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelPaths:
    """Where each kind of model lives. Defaults are A1111's names under one ``models`` root."""

    models_root: Path
    checkpoints: Path | None = None
    vae: Path | None = None
    lora: Path | None = None
    controlnet: Path | None = None
    upscalers: Path | None = None
    embeddings: Path | None = None

    def folder(self, kind: ModelKind) -> Path:
        defaults: dict[str, tuple[Path | None, Path]] = {
            "checkpoint": (self.checkpoints, self.models_root / "Stable-diffusion"),
            "vae": (self.vae, self.models_root / "VAE"),
            "lora": (self.lora, self.models_root / "Lora"),
            "controlnet": (self.controlnet, self.models_root / "ControlNet"),
            "upscaler": (self.upscalers, self.models_root / "ESRGAN"),
            "embedding": (self.embeddings, self.models_root.parent / "embeddings"),
            "vae_approx": (None, self.models_root / "VAE-approx"),
            "sadtalker": (None, self.models_root / "SadTalker"),
            # Stable Diffusion x4 upscaler: diffusers folder or x4-upscaler-ema.safetensors
            "sd_upscaler": (None, self.models_root / "SD-Upscaler"),
        }
        override, default = defaults[kind]
        return override or default


@dataclass(frozen=True)
class ModelEntry:
    """One model file (or diffusers folder) found on disk."""

    kind: ModelKind
    name: str  # path relative to its folder, without extension, "/" separated
    path: Path
    file_format: Literal["safetensors", "pickle", "diffusers"]
    size_bytes: int
    mtime: float = field(compare=False)

    @property
    def filename(self) -> str:
        """Name with extension, as A1111 shows it (``sub/model.safetensors``)."""
        return self.name if self.file_format == "diffusers" else f"{self.name}{self.path.suffix}"

    def title(self, short_hash: str | None) -> str:
        """A1111's checkpoint title: ``model.safetensors [0123456789]``."""
        return f"{self.filename} [{short_hash}]" if short_hash else self.filename

    @property
    def sidecar_yaml(self) -> Path | None:
        if self.file_format == "diffusers":
            return None
        candidate = self.path.with_suffix(".yaml")
        return candidate if candidate.is_file() else None


def _iter_model_files(folder: Path, suffixes: Iterable[str]) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.suffix.lower() in suffixes:
            if any(
                (parent / "model_index.json").is_file() for parent in path.parents if folder in parent.parents
            ):
                continue  # a component file inside a diffusers folder
            found.append(path)
        elif path.is_dir() and (path / "model_index.json").is_file():
            found.append(path)
    return found


class ModelRegistry:
    """Lists models per kind and resolves the names users type (A1111 titles, hashes, stems)."""

    def __init__(self, paths: ModelPaths, hash_cache: HashCache | None = None) -> None:
        self.paths = paths
        self.hashes = hash_cache or HashCache(None)
        self._lock = threading.Lock()
        self._entries: dict[ModelKind, list[ModelEntry]] = {}
        self._families: dict[tuple[Path, float], ModelFamily] = {}

    # listing -------------------------------------------------------------------------------
    def refresh(self, kind: ModelKind | None = None) -> None:
        """Forget cached listings so the next ``list`` rescans (A1111's refresh buttons)."""
        with self._lock:
            if kind is None:
                self._entries.clear()
            else:
                self._entries.pop(kind, None)

    def list(self, kind: ModelKind) -> list[ModelEntry]:
        with self._lock:
            cached = self._entries.get(kind)
        if cached is not None:
            return list(cached)
        folder = self.paths.folder(kind)
        entries = []
        for path in _iter_model_files(folder, WEIGHT_SUFFIXES):
            relative = path.relative_to(folder)
            is_folder = path.is_dir()
            name = relative.as_posix() if is_folder else relative.with_suffix("").as_posix()
            if is_folder:
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                file_format: Literal["safetensors", "pickle", "diffusers"] = "diffusers"
            else:
                size = path.stat().st_size
                file_format = "safetensors" if path.suffix.lower() == ".safetensors" else "pickle"
            entries.append(
                ModelEntry(kind, name, path, file_format, size_bytes=size, mtime=path.stat().st_mtime)
            )
        with self._lock:
            self._entries[kind] = entries
        return list(entries)

    def checkpoints(self) -> list[ModelEntry]:
        return self.list("checkpoint")

    # hashes --------------------------------------------------------------------------------
    def short_hash(self, entry: ModelEntry, *, compute: bool = False) -> str | None:
        """First 10 hex digits of the sha256; computed only when ``compute`` (it reads the file)."""
        full = self.hashes.sha256(entry.path) if compute else self.hashes.cached(entry.path)
        return full[:SHORT_HASH_LENGTH] if full else None

    def title(self, entry: ModelEntry, *, compute_hash: bool = False) -> str:
        return entry.title(self.short_hash(entry, compute=compute_hash))

    # families ------------------------------------------------------------------------------
    def family(self, entry: ModelEntry) -> ModelFamily:
        """Detect (and remember) a checkpoint's family from its header, yaml sidecar or config."""
        key = (entry.path, entry.mtime)
        with self._lock:
            known = self._families.get(key)
        if known is not None:
            return known
        family = detect_entry_family(entry)
        with self._lock:
            self._families[key] = family
        return family

    def describe(self, entry: ModelEntry) -> dict[str, object]:
        """What a listing shows: name, family, size and the hash if already known."""
        try:
            family_label: str = self.family(entry).label
        except (UnknownFamilyError, Exception) as exc:  # listing must never fail on one bad file
            family_label = f"unknown ({exc.__class__.__name__})"
        short = self.short_hash(entry)
        return {
            "title": entry.title(short),
            "model_name": entry.name,
            "filename": str(entry.path),
            "hash": short,
            "sha256": self.hashes.cached(entry.path),
            "family": family_label,
            "size_bytes": entry.size_bytes,
            "format": entry.file_format,
            "config": str(entry.sidecar_yaml) if entry.sidecar_yaml else None,
        }

    # lookup --------------------------------------------------------------------------------
    def find(self, kind: ModelKind, query: str) -> ModelEntry:
        """Resolve what a user typed: title with ``[hash]``, file name with or without extension,
        a bare stem, or a hash prefix. Raises ``ModelNotFoundError`` naming the choices."""
        entries = self.list(kind)
        text = query.strip()
        wanted_hash = None
        if text.endswith("]") and "[" in text:
            text, _, rest = text.rpartition("[")
            wanted_hash = rest.rstrip("]").strip().lower()
            text = text.strip()
        normalized = text.replace("\\", "/")
        stem = normalized
        for suffix in WEIGHT_SUFFIXES:
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        for matcher in (
            lambda e: e.filename == normalized,
            lambda e: e.name == stem,
            lambda e: e.name.lower() == stem.lower(),
            lambda e: Path(e.name).name.lower() == Path(stem).name.lower(),
        ):
            matches = [e for e in entries if matcher(e)]
            if len(matches) == 1:
                return matches[0]
            if matches and wanted_hash:
                for entry in matches:
                    if (self.short_hash(entry, compute=True) or "").startswith(wanted_hash):
                        return entry
            if matches:
                return matches[0]
        candidates = [stem.lower(), wanted_hash] if wanted_hash else [stem.lower()]
        for entry in entries:
            known = self.hashes.cached(entry.path)
            if known and any(c and len(c) >= 8 and known.startswith(c) for c in candidates):
                return entry
        if not entries:
            folder = self.paths.folder(kind)
            if kind == "checkpoint":
                raise NoModelsError(no_checkpoints_message(folder))
            raise ModelNotFoundError(f"No {kind} models in {folder}; '{query}' cannot be found.")
        choices = ", ".join(e.filename for e in entries[:20])
        raise ModelNotFoundError(
            f"{kind} '{query}' not found in {self.paths.folder(kind)}. Available: {choices}"
        )

    def default_checkpoint(self, preferred: str | None = None) -> ModelEntry:
        """The configured default, else the first checkpoint (as A1111 picks at startup)."""
        if preferred:
            return self.find("checkpoint", preferred)
        entries = self.checkpoints()
        if not entries:
            raise NoModelsError(no_checkpoints_message(self.paths.folder("checkpoint")))
        return entries[0]


def no_checkpoints_message(folder: Path) -> str:
    return (
        f"No Stable Diffusion checkpoint found in {folder}.\n"
        "Put a .safetensors checkpoint (or a diffusers folder) there, or download the standard "
        f"SD1.5 model with:\n    {standard_download_command()}"
    )


def detect_entry_family(entry: ModelEntry) -> ModelFamily:
    """Family of a checkpoint file or folder, reading only headers and small config files."""
    import yaml

    if entry.file_format == "diffusers":
        index = json.loads((entry.path / "model_index.json").read_text(encoding="utf-8"))
        configs = {}
        for component, filename in (
            ("unet", "config.json"),
            ("text_encoder", "config.json"),
            ("scheduler", "scheduler_config.json"),
        ):
            config_file = entry.path / component / filename
            if config_file.is_file():
                configs[component] = json.loads(config_file.read_text(encoding="utf-8"))
        return detect_diffusers_family(index, configs)
    original_config = None
    if entry.sidecar_yaml is not None:
        original_config = yaml.safe_load(entry.sidecar_yaml.read_text(encoding="utf-8"))
    if entry.file_format == "safetensors":
        header = read_safetensors_header(entry.path)
        shapes = {key: info.shape for key, info in header.tensors.items()}
    else:
        shapes = {key: tuple(value.shape) for key, value in read_pickled_state_dict(entry.path).items()}
    return detect_family(shapes, original_config=original_config, name=entry.filename)
