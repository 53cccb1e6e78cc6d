"""File-system rules that Windows adds: briefly locked files, and names it refuses (stdlib only).

* Locked files: on Windows ``os.replace`` fails with ``PermissionError`` (sharing violation, access
  denied) while another program has the destination open: an image viewer showing the previous
  output, an antivirus scanner or the search indexer reading a file that was just written. Those locks
  last milliseconds to a second or two, so :func:`replace_with_retry` tries again with a growing pause
  before giving up with a message that says what to close. Elsewhere a ``PermissionError`` is a real
  permission problem and is raised at once.
* Names: Windows refuses ``< > : " / \\ | ? *`` and control characters in names, names ending in a
  dot or a space, and the device names ``CON``, ``PRN``, ``AUX``, ``NUL``, ``COM1``-``COM9`` and
  ``LPT1``-``LPT9`` with any extension (``NUL.png``). :func:`windows_safe_name` turns any name into
  one that is valid on every system.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

REPLACE_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Pauses between tries of a locked ``os.replace`` (about 3 s in all)."""

_RESERVED_STEMS = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{n}" for n in (*range(1, 10), "¹", "²", "³")}
    | {f"LPT{n}" for n in (*range(1, 10), "¹", "²", "³")}
)
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def running_on_windows() -> bool:
    return os.name == "nt"


def replace_with_retry(
    source: Path,
    destination: Path,
    *,
    is_windows: bool | None = None,
    sleep: Callable[[float], None] | None = None,
    replace: Callable[[Path, Path], None] | None = None,
) -> None:
    """``os.replace(source, destination)``, retried on Windows while the destination is locked."""
    windows = running_on_windows() if is_windows is None else is_windows
    sleep = sleep or time.sleep
    replace = replace or os.replace
    delays = REPLACE_DELAYS_S if windows else ()
    for delay in (*delays, None):
        try:
            replace(source, destination)
            return
        except PermissionError as exc:
            if delay is None:
                if windows:
                    raise PermissionError(
                        exc.errno,
                        f"could not write {destination}: another program keeps it open (an image viewer, "
                        "an antivirus scan or a sync client). Close it and try again",
                        str(destination),
                    ) from exc
                raise
            sleep(delay)


def is_valid_windows_name(name: str) -> bool:
    """Whether Windows accepts ``name`` as one file or folder name."""
    if not name or name in (".", "..") or _FORBIDDEN.search(name) or name[-1] in ". ":
        return False
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    return stem not in _RESERVED_STEMS


def windows_safe_name(name: str, *, replacement: str = "_") -> str:
    """``name`` with what Windows refuses replaced: forbidden characters, a trailing dot or space, and
    reserved device names (``NUL.png`` -> ``_NUL.png``). Valid names come back unchanged."""
    cleaned = _FORBIDDEN.sub(replacement, name).rstrip(". ") or replacement
    if cleaned in (".", ".."):
        cleaned = replacement
    stem = cleaned.split(".", 1)[0].rstrip(" ").upper()
    if stem in _RESERVED_STEMS:
        cleaned = replacement + cleaned
    return cleaned
