"""Saved prompt styles in AUTOMATIC1111's ``styles.csv`` format.

The file has the columns ``name,prompt,negative_prompt``. A style's prompt either contains the
placeholder ``{prompt}`` (the user's prompt is put there) or is appended to the user's prompt after
a comma. Styles apply in the order they are listed in a request's ``styles`` field, so the UI, the
API and the CLI all get the same text.

The file is read on every use (it is tiny): styles saved in the UI, edited by hand or copied from
an A1111 install show up without a restart, and several studio processes can share it.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import StudioError

PROMPT_PLACEHOLDER = "{prompt}"
STYLE_COLUMNS = ("name", "prompt", "negative_prompt")


class UnknownStyleError(StudioError):
    """A request names a style that is not in ``styles.csv``."""


class StyleFileError(StudioError):
    """``styles.csv`` cannot be read or written."""


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_style_text(style_text: str, text: str) -> str:
    """Put ``text`` into a style's text: at ``{prompt}`` when present, else ``text, style``."""
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


class StyleStore:
    """Reads and writes one ``styles.csv``; thread-safe within a process (writes are atomic)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    # reading ---------------------------------------------------------------------------------
    def load(self) -> dict[str, PromptStyle]:
        """All styles by name, in file order (a missing file means no styles)."""
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StyleFileError(f"Cannot read the styles file {self.path}: {exc.strerror}.") from exc
        styles: dict[str, PromptStyle] = {}
        for row in csv.DictReader(io.StringIO(text)):
            name = (row.get("name") or "").strip()
            if not name:
                continue
            styles[name] = PromptStyle(
                name=name,
                prompt=row.get("prompt") or "",
                negative_prompt=row.get("negative_prompt") or "",
            )
        return styles

    def names(self) -> list[str]:
        return list(self.load())

    def get(self, name: str) -> PromptStyle:
        styles = self.load()
        style = styles.get(name)
        if style is None:
            choices = ", ".join(styles) or "none saved yet"
            raise UnknownStyleError(
                f"Style '{name}' is not in {self.path} (saved styles: {choices}). "
                "Save it in the Styles editor of the txt2img tab, or remove it from the request."
            )
        return style

    # applying --------------------------------------------------------------------------------
    def apply(self, prompt: str, negative_prompt: str, names: Iterable[str]) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied, in order."""
        for name in names:
            style = self.get(name)
            prompt = merge_style_text(style.prompt, prompt)
            negative_prompt = merge_style_text(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    # writing ---------------------------------------------------------------------------------
    def save_style(self, style: PromptStyle) -> None:
        """Add a style, or replace the one with the same name (keeping its place)."""
        name = style.name.strip()
        if not name:
            raise StyleFileError("A style needs a name.")
        with self._lock:
            styles = self.load()
            styles[name] = PromptStyle(name, style.prompt, style.negative_prompt)
            self._write(styles.values())

    def delete(self, name: str) -> bool:
        """Remove a style; False when there was none by that name."""
        with self._lock:
            styles = self.load()
            if styles.pop(name, None) is None:
                return False
            self._write(styles.values())
            return True

    def _write(self, styles: Iterable[PromptStyle]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=STYLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for style in styles:
            writer.writerow(
                {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text(buffer.getvalue(), encoding="utf-8")
            os.replace(temp, self.path)
        except OSError as exc:
            raise StyleFileError(f"Cannot write the styles file {self.path}: {exc.strerror}.") from exc


def apply_request_styles(request: Any, store: StyleStore | None) -> Any:
    """A copy of ``request`` with its ``styles`` written into the prompts (and the list emptied,
    so applying twice changes nothing); requests without styles come back unchanged."""
    names = list(getattr(request, "styles", None) or [])
    if not names or store is None:
        return request
    prompt, negative = store.apply(request.prompt, request.negative_prompt, names)
    return request.model_copy(update={"prompt": prompt, "negative_prompt": negative, "styles": []})
