"""Models a cluster node lacks come from the head, in chunks, verified by sha256.

The head runs one :class:`ModelLibrary` actor on its own node: it resolves a model name as the
head's registry does and serves the file's bytes by offset. Before a job (or a model switch) a
worker asks :class:`ModelSync` for every model the request names (checkpoint, VAE, LoRAs, ControlNet
models); whatever its own ``models/`` folder lacks is copied into the same sub-path there, into a
``.part`` file first, hashed while it arrives and renamed only when the sha256 matches the head's.
So an interrupted copy is never taken for a model, and the next job on that PC finds the file.
Nothing is copied when the studio shares one models folder (``--cluster-shared-models``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIBRARY_NAME = "sdstudio-model-library"
NAMESPACE = "sdstudio"
CHUNK_BYTES = 8 * 2**20
"""One Ray call's worth of a model file (large enough to be quick, small enough for the object store)."""
_LORA_TAG = re.compile(r"<(?:lora|lyco):([^:>]+)", re.IGNORECASE)


class ModelSyncError(RuntimeError):
    """A copy from the head failed its sha256 check, or the head could not send it."""


def required_models(request: dict[str, Any], default_checkpoint: str | None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every model a job request names, in the registry's kinds."""
    wanted: list[tuple[str, str]] = []
    overrides = request.get("override_settings") or {}
    checkpoint = overrides.get("sd_model_checkpoint") or default_checkpoint
    if request.get("mode", "txt2img") in ("txt2img", "img2img") and checkpoint:
        wanted.append(("checkpoint", str(checkpoint)))
    vae = overrides.get("sd_vae")
    if vae and str(vae) not in ("Automatic", "None"):
        wanted.append(("vae", str(vae)))
    for text in (request.get("prompt") or "", request.get("negative_prompt") or ""):
        wanted += [("lora", name.strip()) for name in _LORA_TAG.findall(str(text))]
    for unit in request.get("controlnet_units") or []:
        model = (unit or {}).get("model")
        if (unit or {}).get("enabled", True) and model and model != "None":
            wanted.append(("controlnet", str(model)))
    return list(dict.fromkeys(wanted))


class ModelLibrary:
    """The head's models, served to the cluster (a Ray actor on the head's node)."""

    def __init__(self, settings_json: str) -> None:
        from app.services import build_registry
        from app.settings import StudioSettings

        self.registry = build_registry(StudioSettings.model_validate_json(settings_json))

    def describe(self, kind: str, name: str) -> dict[str, Any] | None:
        """Where ``name`` lives under its kind's folder and each of its files with size and sha256;
        None when the head does not have it either."""
        from pipelines.errors import ModelNotFoundError, NoModelsError

        self.registry.refresh(kind)  # type: ignore[arg-type]
        try:
            entry = self.registry.find(kind, name)  # type: ignore[arg-type]
        except (ModelNotFoundError, NoModelsError, ValueError):
            return None
        folder = self.registry.paths.folder(kind)  # type: ignore[arg-type]
        if entry.path.is_dir():
            paths = sorted(p for p in entry.path.rglob("*") if p.is_file())
        else:
            paths = [entry.path] + ([entry.sidecar_yaml] if entry.sidecar_yaml else [])
        files = [
            {
                "path": path.relative_to(folder).as_posix(),
                "size": path.stat().st_size,
                "sha256": self.registry.hashes.sha256(path),
            }
            for path in paths
        ]
        return {"kind": kind, "name": entry.name, "files": files}

    def read(self, kind: str, relative: str, offset: int, length: int) -> bytes:
        folder = self.registry.paths.folder(kind).resolve()  # type: ignore[arg-type]
        path = (folder / relative).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise ModelSyncError(f"{relative} is not a model file of the head")
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(min(length, CHUNK_BYTES))


class ModelSync:
    """A worker's side: make sure its registry has what a request names, copying from the head."""

    def __init__(self, registry: Any, library: Any) -> None:
        self.registry = registry
        self.library = library

    def ensure(
        self, request: dict[str, Any], default_checkpoint: str | None, say: Callable[[str], None]
    ) -> None:
        for kind, name in required_models(request, default_checkpoint):
            self.ensure_one(kind, name, say)

    def ensure_one(self, kind: str, name: str, say: Callable[[str], None]) -> bool:
        """Copy ``name`` from the head when this node lacks it; True when a copy was made."""
        from pipelines.errors import ModelNotFoundError, NoModelsError

        try:
            self.registry.find(kind, name)
            return False
        except (ModelNotFoundError, NoModelsError):
            pass
        import ray

        description = ray.get(self.library.describe.remote(kind, name))
        if description is None:
            return False  # the head lacks it too: the job reports the missing model as usual
        folder = self.registry.paths.folder(kind)
        total = sum(item["size"] for item in description["files"])
        say(f"Copying {kind} {description['name']} from the studio head ({total / 2**20:.0f} MB)…")
        for item in description["files"]:
            self._copy_file(kind, folder, item)
        self.registry.refresh(kind)
        log.info("copied %s %s from the head (%d bytes, sha256 checked)", kind, name, total)
        return True

    def _copy_file(self, kind: str, folder: Path, item: dict[str, Any]) -> None:
        import ray

        target = (folder / item["path"]).resolve()
        if not target.is_relative_to(folder.resolve()):
            raise ModelSyncError(f"the head named a path outside {folder}: {item['path']}")
        same_size = target.is_file() and target.stat().st_size == item["size"]
        if same_size and self.registry.hashes.sha256(target) == item["sha256"]:
            return  # already here (e.g. a sidecar shared with another model)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        offset = 0
        with partial.open("wb") as handle:
            while offset < item["size"]:
                chunk = ray.get(self.library.read.remote(kind, item["path"], offset, CHUNK_BYTES))
                if not chunk:
                    break
                handle.write(chunk)
                digest.update(chunk)
                offset += len(chunk)
        if digest.hexdigest() != item["sha256"]:
            partial.unlink(missing_ok=True)
            raise ModelSyncError(
                f"the copy of {item['path']} from the studio head failed its sha256 check "
                f"({offset} of {item['size']} bytes); it was deleted and will be copied again next time"
            )
        os.replace(partial, target)


def start_library(settings_json: str) -> Any:
    """Create the head's library actor on this (the head's) node; returns its handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(ModelLibrary)
        .options(
            name=LIBRARY_NAME,
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=4,
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        )
        .remote(settings_json)
    )


def find_library() -> Any | None:
    import ray

    try:
        return ray.get_actor(LIBRARY_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
