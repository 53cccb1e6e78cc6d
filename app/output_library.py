"""What the image browser reads: the pictures under ``outputs/``, newest first, with their
infotext, cached thumbnails, and deletion confined to ``outputs/``.

Kept free of Gradio so the rules (what a user may see and delete) are tested on their own. With
``--auth`` a user sees only the pictures their own jobs wrote (the job store knows), unless
``--share-outputs``; without it the studio has one user, who sees everything in ``outputs/``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
THUMBNAIL_SIDE = 256
ALL = "All"


class OutputAccessError(ValueError):
    """A path the user may not touch through the browser (outside ``outputs/``, or not theirs)."""


@dataclass(frozen=True)
class OutputImage:
    path: Path
    folder: str  # the top folder under outputs/: "txt2img-images", "extras-images", ...
    day: str  # the dated sub-folder ("2026-12-05"), or "" when there is none
    mtime: float

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class OutputPage:
    images: list[OutputImage]
    total: int
    page: int
    pages: int


class OutputLibrary:
    """Lists, describes and deletes pictures under ``outputs_root``; thread-safe."""

    def __init__(self, outputs_root: Path, thumbnails_dir: Path) -> None:
        self.outputs_root = Path(outputs_root)
        self.thumbnails_dir = Path(thumbnails_dir)
        self._infotexts: dict[Path, tuple[float, str]] = {}
        self._lock = threading.Lock()

    # listing ---------------------------------------------------------------------------------
    def scan(self, visible: Callable[[Path], bool] | None = None) -> list[OutputImage]:
        """Every picture (hidden folders such as ``.batch-state`` skipped), newest first."""
        root = self.outputs_root
        found: list[OutputImage] = []
        if not root.is_dir():
            return found
        for directory, folders, files in os.walk(root):
            folders[:] = [name for name in folders if not name.startswith(".")]
            here = Path(directory)
            relative = here.relative_to(root).parts
            for name in files:
                if not name.lower().endswith(IMAGE_SUFFIXES) or name.startswith("."):
                    continue
                path = here / name
                if visible is not None and not visible(path):
                    continue
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue  # deleted while we looked
                folder = relative[0] if relative else ""
                day = relative[1] if len(relative) > 1 else ""
                found.append(OutputImage(path=path, folder=folder, day=day, mtime=mtime))
        found.sort(key=lambda image: (image.mtime, image.name), reverse=True)
        return found

    def page(
        self,
        images: list[OutputImage],
        *,
        folder: str = ALL,
        day: str = ALL,
        search: str = "",
        page: int = 1,
        per_page: int = 24,
    ) -> OutputPage:
        """One page of ``images`` after the filters; ``search`` matches words of the infotext
        (prompt, negative prompt and parameters), every word, any case."""
        chosen = [
            image
            for image in images
            if (folder in (ALL, "", None) or image.folder == folder)
            and (day in (ALL, "", None) or image.day == day)
        ]
        words = search.lower().split()
        if words:
            chosen = [image for image in chosen if all(w in self.infotext(image.path).lower() for w in words)]
        pages = max(1, -(-len(chosen) // per_page))
        page = min(max(1, page), pages)
        start = (page - 1) * per_page
        return OutputPage(images=chosen[start : start + per_page], total=len(chosen), page=page, pages=pages)

    @staticmethod
    def folders(images: Iterable[OutputImage]) -> list[str]:
        return sorted({image.folder for image in images if image.folder})

    @staticmethod
    def days(images: Iterable[OutputImage]) -> list[str]:
        return sorted({image.day for image in images if image.day}, reverse=True)

    # one picture -----------------------------------------------------------------------------
    def infotext(self, path: Path) -> str:
        """The parameters stored in the picture (cached until the file changes)."""
        from pipelines.outputs.saving import read_png_parameters

        try:
            mtime = path.stat().st_mtime
        except OSError:
            return ""
        with self._lock:
            cached = self._infotexts.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            text = read_png_parameters(path) or ""
        except (OSError, ValueError):
            text = ""
        with self._lock:
            self._infotexts[path] = (mtime, text)
        return text

    def thumbnail(self, path: Path) -> Image.Image:
        """A small copy of the picture, made once and kept in ``thumbnails_dir`` (keyed by the file's
        path, size and time, so an overwritten file gets a new one)."""
        from PIL import Image

        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
        cached = self.thumbnails_dir / key[:2] / f"{key}.webp"
        if cached.is_file():
            with Image.open(cached) as image:
                image.load()
                return image.copy()
        with Image.open(path) as image:
            image.load()
            small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        small.save(partial, format="WEBP", quality=82)
        os.replace(partial, cached)
        return small

    def inside(self, path: str | Path) -> Path:
        """``path`` resolved, if it is a picture inside ``outputs/``; else :class:`OutputAccessError`."""
        root = self.outputs_root.resolve()
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root) or resolved == root:
            raise OutputAccessError(
                f"{Path(path).name}: only pictures inside the outputs folder can be changed here."
            )
        if resolved.suffix.lower() not in IMAGE_SUFFIXES:
            raise OutputAccessError(f"{resolved.name}: not a picture of the outputs folder.")
        return resolved

    def delete(self, path: str | Path, visible: Callable[[Path], bool] | None = None) -> Path:
        """Delete one picture inside ``outputs/`` that the user may see; returns the deleted path."""
        resolved = self.inside(path)
        if visible is not None and not (visible(Path(path)) or visible(resolved)):
            raise OutputAccessError(f"{resolved.name}: this picture is not one of yours.")
        if not resolved.is_file():
            raise OutputAccessError(f"{resolved.name}: already gone (deleted elsewhere?).")
        resolved.unlink()
        with self._lock:
            self._infotexts.pop(Path(path), None)
            self._infotexts.pop(resolved, None)
        return resolved


def owned_outputs(records: Iterable[object]) -> set[Path]:
    """The resolved paths of the pictures the given job records wrote (their results and outputs)."""
    paths: set[Path] = set()
    for record in records:
        result = getattr(record, "result", None) or {}
        for value in [*getattr(record, "outputs", []), *result.get("images", [])]:
            if isinstance(value, str) and not value.startswith("artifact:"):
                paths.add(Path(value).resolve())
    return paths
