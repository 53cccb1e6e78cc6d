"""The command the user started the studio with, for every hint that tells them what to run next.

A hint saying ``python launch.py download ...`` fails for someone whose shell only knows
``python3``, and a Windows user started ``.\\launch.bat``. ``launch.py`` restarts itself inside
``.venv`` (whose interpreter the user never typed), so it records the original command in the
environment *before* that restart (:func:`remember_launch_command`); ``launch.bat`` sets it
itself. Everything that prints a command (UI, CLI, engine messages, worker processes, which
inherit the environment) reads it back with :func:`launch_command`.

It lives in the installer because the launcher records it before anything but this package can
be imported (standard library only); ``pipelines/`` and ``sadtalker/`` may import it without
pulling in the app.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

LAUNCH_COMMAND_ENV = "SDSTUDIO_LAUNCH_COMMAND"
README_COMMAND = "python3 launch.py"  # what README.md tells Linux and macOS users to type
WINDOWS_COMMAND = r".\launch.bat"


def detect_launch_command(orig_argv: Sequence[str], script: str) -> str:
    """``python3 launch.py`` from the interpreter and script exactly as typed (``sys.orig_argv``
    keeps ``python3`` even when ``sys.executable`` is a resolved path); ``./launch.py`` run through
    its shebang is shown as typed, without an interpreter."""
    interpreter = orig_argv[0] if orig_argv else ""
    shown_script = script or "launch.py"
    if not interpreter or Path(interpreter).name == Path(shown_script).name:
        return _join([shown_script])
    return _join([interpreter, shown_script])


def _join(words: Sequence[str]) -> str:
    if os.name == "nt":
        return " ".join(f'"{w}"' if " " in w else w for w in words)
    return shlex.join(words)


def remember_launch_command(environ: MutableMapping[str, str] | None = None) -> str:
    """Record how this process was started unless an outer launcher (``launch.bat``, or this
    launcher before its restart into ``.venv``) already did; returns the recorded command."""
    env = os.environ if environ is None else environ
    if not env.get(LAUNCH_COMMAND_ENV):
        env[LAUNCH_COMMAND_ENV] = detect_launch_command(getattr(sys, "orig_argv", sys.argv), sys.argv[0])
    return env[LAUNCH_COMMAND_ENV]


def launch_command(*args: str, system: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``<how the user started the studio> <args>``, e.g. ``python3 launch.py download x``. Without
    a recorded command (a library used on its own, a test) it is README's spelling for ``system``
    (``sys.platform`` by default): ``.\\launch.bat`` on Windows, ``python3 launch.py`` elsewhere."""
    env = os.environ if environ is None else environ
    base = env.get(LAUNCH_COMMAND_ENV, "").strip()
    if not base:
        base = WINDOWS_COMMAND if (system or sys.platform).startswith("win") else README_COMMAND
    return " ".join([base, *args])
