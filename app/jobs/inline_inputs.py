"""Input files that travel with a job to a worker on another PC.

A talking head names its portrait, speech and reference videos by path on the head's disk (the API
and the UI stage uploads there); a worker on another PC cannot read them, so the head sends the
files' bytes with the job (:class:`~contract.worker.InlineFile`) and the worker saves them in its
scratch folder. Image jobs carry their images inline already (base64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contract.worker import InlineFile

PATH_FIELDS = {"talking_head": ("image", "audio", "ref_eyeblink", "ref_pose")}


def inline_files(request: dict[str, Any]) -> list[InlineFile]:
    """The request's input files that exist on this PC, to send with it."""
    files = []
    for name in PATH_FIELDS.get(str(request.get("mode")), ()):
        value = request.get(name)
        if not value:
            continue
        path = Path(str(value))
        try:
            data = path.read_bytes()
        except OSError:
            continue  # the worker reports the missing file in the user's words
        files.append(InlineFile(request_field=name, name=path.name or name, data=data))
    return files
