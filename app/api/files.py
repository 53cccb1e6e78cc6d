"""``GET /studio/v1/files/{path}``: result files, served from the outputs folder and nowhere else.

The path is resolved (symlinks and ``..`` included) and must land inside ``outputs_dir``; hidden
names (temp files, counter reservations) and file types other than images, talking-head MP4s and
their JSON sidecars are refused. Every refusal is a plain 404, so the answer says nothing about what exists
outside the folder.

With auth on, a file is served only to the user whose job wrote it (the job store records every
output with its job's owner; a name is a counter and a seed, easily guessed): another user, or a
file no job of theirs wrote, gets the same 404. ``--share-outputs`` serves every output to every
authenticated user; without auth everyone is one user and gets every file.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from app.api.context import FILES_PREFIX, ApiContext
from app.api.security import Caller

SERVED_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".mp4": "video/mp4",
    ".json": "application/json",
}


def resolve_output_file(outputs_dir: Path, requested: str) -> Path | None:
    """The file ``requested`` names inside ``outputs_dir``, or None when it is not a servable output."""
    if not requested or "\x00" in requested or "\\" in requested:
        return None
    relative = Path(requested)
    if relative.is_absolute() or any(
        part in ("", ".", "..") or part.startswith(".") for part in relative.parts
    ):
        return None
    root = outputs_dir.resolve()
    try:
        candidate = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    if candidate.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return candidate


def may_read_output(context: ApiContext, caller: Caller, requested: str, found: Path) -> bool:
    """Whether ``caller`` may have the output file ``found`` (``requested`` inside the outputs folder)."""
    if not caller.authenticated or context.services.settings.share_outputs:
        return True
    store = context.queue.store
    owner = store.owner_of_output(context.outputs_dir / requested)
    if owner is None:
        owner = store.owner_of_output(found)
    # The UI records jobs under the login name, the API under "user:<name>": the same person.
    return owner is not None and owner in (caller.owner, caller.user)


def files_router(context: ApiContext) -> APIRouter:
    caller_dependency = Depends(context.auth.require_user)
    router = APIRouter(
        prefix=FILES_PREFIX, tags=["studio"], dependencies=[Depends(context.auth.require_user)]
    )

    @router.get(
        "/{path:path}",
        response_class=FileResponse,
        responses={
            200: {"content": {media: {} for media in sorted(set(SERVED_SUFFIXES.values()))}},
            404: {"description": "No such output file"},
        },
    )
    def get_output_file(path: str, caller: Caller = caller_dependency) -> FileResponse:
        """An output file (image, video or sidecar) by its path inside the outputs folder, as given
        in job result links; with auth on, only the caller's own (unless --share-outputs)."""
        found = resolve_output_file(context.outputs_dir, path)
        if found is None or not may_read_output(context, caller, path, found):
            raise HTTPException(status_code=404, detail="No such output file.")
        return FileResponse(found, media_type=SERVED_SUFFIXES[found.suffix.lower()])

    return router
