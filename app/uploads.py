"""Files API clients send for a job (a talking head's portrait and speech), staged on disk.

The engines read their inputs from files, but an API client can only send the files' contents; it
must never be able to name a path on the server. So the API decodes the upload and writes it here,
under ``<data_dir>/uploads/<random hex>/`` with names the studio chooses, and the job refers to
those files.

Lifetime: a job's folder is removed as soon as the job has run (done, failed or interrupted; see
``TalkingHeadService.run``). Folders whose job never ran (cancelled while waiting, or left behind by
a crash) are removed by :meth:`StagedUploads.prune`, which the API calls under :attr:`lock` before it
stages the next upload, keeping every folder that a queued or running job still refers to. The lock
also keeps a prune from removing a folder staged but not yet queued.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Request fields that may hold a staged file (the talking head's inputs).
STAGED_FIELDS = ("image", "audio", "ref_eyeblink", "ref_pose")


class StagedUploads:
    """``root/<token>/<name>`` folders of uploaded job inputs; thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lock = threading.Lock()  # held by whoever stages and queues, and by prune

    def new_folder(self) -> Path:
        """A fresh, empty folder with an unguessable name."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            folder = self.root / secrets.token_hex(16)
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            return folder

    def folder_of(self, path: str | Path | None) -> Path | None:
        """The staging folder holding ``path``, or None when ``path`` is not a staged upload."""
        if not path:
            return None
        try:
            parent = Path(path).resolve().parent
        except (OSError, RuntimeError):
            return None
        return parent if parent.parent == self.root.resolve() else None

    def folders_of(self, request: Any) -> set[Path]:
        """The staging folders a request (a model or its JSON payload) refers to."""
        values = (
            (request.get(name) for name in STAGED_FIELDS)
            if isinstance(request, dict)
            else (getattr(request, name, None) for name in STAGED_FIELDS)
        )
        return {folder for value in values if (folder := self.folder_of(value)) is not None}

    def release(self, request: Any) -> None:
        """Remove the staged inputs of a job that has finished (a no-op for inputs staged elsewhere)."""
        for folder in self.folders_of(request):
            remove_folder(folder)

    def prune(self, active_requests: Iterable[dict[str, Any]]) -> int:
        """Remove every staging folder no active (queued or running) job refers to; returns the count.

        Call it holding :attr:`lock`, so that a folder being staged is not taken for an orphan.
        """
        if not self.root.is_dir():
            return 0
        keep = set().union(*(self.folders_of(request) for request in active_requests))
        removed = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.resolve() not in keep:
                remove_folder(folder)
                removed += 1
        return removed


def remove_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)
