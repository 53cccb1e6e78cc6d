"""The head writes what workers produce into ``outputs/``, exactly where an in-process job would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.artifacts import Artifact
from pipelines.outputs.saving import atomic_write_bytes, dated_output_dir, save_encoded_atomically


def write_artifact(outputs_root: Path, artifact: Artifact, *, paired: dict[str, Path] | None = None) -> Path:
    """Write one artifact atomically and return its path.

    Images and grids get A1111's ``<folder>-images|grids/YYYY-MM-DD/NNNNN-SEED.png`` names; videos
    keep the stem the worker chose under ``outputs/<folder>/`` (a number is added if it is taken) and
    a sidecar takes its video's final stem (``paired`` maps video sha256 -> path).
    """
    if artifact.kind in ("image", "grid"):
        kind = "grids" if artifact.kind == "grid" else "images"
        directory = dated_output_dir(outputs_root, artifact.folder, kind=kind)
        return save_encoded_atomically(
            artifact.data, directory, seed=artifact.seed or 0, extension=artifact.extension
        )
    directory = Path(outputs_root) / plain_name(artifact.folder)
    directory.mkdir(parents=True, exist_ok=True)
    if artifact.kind == "sidecar" and paired and artifact.pairs_with in paired:
        path = paired[artifact.pairs_with].with_suffix(f".{plain_name(artifact.extension)}")
    else:
        stem = plain_name(artifact.stem or artifact.sha256[:16])
        path, counter = directory / f"{stem}.{plain_name(artifact.extension)}", 1
        while path.exists():
            path, counter = directory / f"{stem}-{counter}.{plain_name(artifact.extension)}", counter + 1
    atomic_write_bytes(path, artifact.data)
    return path


def plain_name(name: str) -> str:
    """A single safe path component (artifacts come from another process, maybe another PC)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip(".")
    if not cleaned:
        raise ValueError(f"artifact name {name!r} is not a usable file name")
    return cleaned


def replace_refs(value: Any, paths: dict[str, str]) -> Any:
    """``info`` with every artifact ref replaced by the path the head wrote it to."""
    if isinstance(value, str):
        return paths.get(value, value)
    if isinstance(value, list):
        return [replace_refs(item, paths) for item in value]
    if isinstance(value, dict):
        return {key: replace_refs(item, paths) for key, item in value.items()}
    return value
