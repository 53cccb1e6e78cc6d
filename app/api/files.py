"""``GET /studio/v1/files/{path}``: result files, served from the outputs folder and nowhere else.

The path is resolved (symlinks and ``..`` included) and must land inside ``outputs_dir``; hidden
names (temp files, counter reservations) and file types other than images, talking-head MP4s and
their JSON sidecars are refused. Every refusal is a plain 404, so the answer says nothing about what exists
outside the folder.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from app.api.context import FILES_PREFIX, ApiContext

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


def files_router(context: ApiContext) -> APIRouter:
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
    def get_output_file(path: str) -> FileResponse:
        """An output file (image, video or sidecar) by its path inside the outputs folder, as given
        in job result links."""
        found = resolve_output_file(context.outputs_dir, path)
        if found is None:
            raise HTTPException(status_code=404, detail="No such output file.")
        return FileResponse(found, media_type=SERVED_SUFFIXES[found.suffix.lower()])

    return router
