"""Run pip quietly: one progress line per step on screen, everything in a log file.

A first install prints hundreds of lines of pip output and then goes silent for minutes while
PyTorch downloads. Instead each step shows one line that is rewritten in place on a terminal
("[2/3] PyTorch with CUDA 12.8: downloading torch-2.14.1+cu128 (1.2 of 2.5 GB)"), or a start and an
end line when the output is a file or a CI log. pip's complete output goes to ``data/logs/``; when a
step fails, its last lines and the log's path are shown.

pip's cache is left on (no ``--no-cache-dir``): a download that an interrupted run finished is not
downloaded again when the install is run again.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

DRY_RUN_ENV = "SDSTUDIO_INSTALL_DRY_RUN"
_TAIL_LINES = 25
_REDRAW_EVERY_S = 0.2

_COLLECTING = re.compile(r"^\s*Collecting (\S+)")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)(?:\s+\(([\d.]+)\s*([kMG]B)\))?")
_CACHED = re.compile(r"^\s*Using cached (\S+)")
_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")
_INSTALLING = re.compile(r"^\s*Installing collected packages: (.+)$")
_SUCCESS = re.compile(r"^\s*Successfully installed (.+)$")
_UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def format_command(command: Sequence[str]) -> str:
    """A command as the user would type it in their shell."""
    if os.name == "nt":
        return subprocess.list2cmdline(list(command))
    return shlex.join(list(command))


def _size(num_bytes: float) -> str:
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.1f} GB"
    return f"{num_bytes / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def new_log_path(logs_dir: Path, name: str = "install") -> Path:
    """``data/logs/install-YYYYmmdd-HHMMSS.log`` (the folder is created)."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    return logs_dir / f"{name}-{datetime.now():%Y%m%d-%H%M%S}.log"


class StepFailedError(RuntimeError):
    """A pip step exited non-zero; the message has pip's last lines, the log path and a hint."""

    def __init__(self, message: str, *, tail: list[str], log_path: Path | None) -> None:
        super().__init__(message)
        self.tail = tail
        self.log_path = log_path

    @property
    def no_matching_wheel(self) -> bool:
        """pip found no wheel for the pinned version on the index (a CUDA build not published)."""
        return any(
            "No matching distribution found" in line or "Could not find a version that satisfies" in line
            for line in self.tail
        )


def failure_hint(tail: Sequence[str]) -> str:
    text = "\n".join(tail)
    if "No space left on device" in text or "Errno 28" in text:
        return (
            "The disk is full: free some space and run the same command again (finished downloads are kept)."
        )
    if "No matching distribution found" in text or "Could not find a version that satisfies" in text:
        return (
            "pip found no matching package on the index. For PyTorch, another CUDA build may be available: "
            "see README, 'Choosing a CUDA build of PyTorch' (--torch-index-url)."
        )
    if re.search(
        r"(ConnectionError|Max retries exceeded|Temporary failure in name resolution|timed out)", text
    ):
        return "pip could not reach the package index: check the internet connection or proxy (HTTPS_PROXY)."
    if "PermissionError" in text or "Access is denied" in text:
        return (
            "A file was locked or not writable: close other programs using this folder's Python (another "
            "SD Studio window, an editor's terminal) and run the same command again."
        )
    return "Run the same command again: finished downloads are kept in pip's cache."


@dataclass
class _Progress:
    """What pip's output has said so far in one step."""

    collected: int = 0
    to_install: int = 0
    current: str = ""
    current_total: float = 0.0
    current_done: float = 0.0
    installing: bool = False
    installed: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        if match := _COLLECTING.match(line):
            self.collected += 1
            self.current = match.group(1)
            self.current_total = self.current_done = 0.0
        elif match := _DOWNLOADING.match(line):
            self.current = match.group(1).rsplit("/", 1)[-1]
            self.current_done = 0.0
            if match.group(2):
                self.current_total = float(match.group(2)) * _UNITS[match.group(3)]
        elif match := _CACHED.match(line):
            self.current = match.group(1).rsplit("/", 1)[-1] + " (cached)"
            self.current_total = self.current_done = 0.0
        elif match := _PROGRESS.search(line):
            self.current_done = float(match.group(1))
            self.current_total = float(match.group(2)) or self.current_total
        elif match := _INSTALLING.match(line):
            self.to_install = len([name for name in match.group(1).split(",") if name.strip()])
            self.installing = True
        elif match := _SUCCESS.match(line):
            self.installed = match.group(1).split()

    def status(self) -> str:
        if self.installing:
            return f"installing {self.to_install} package{'s' if self.to_install != 1 else ''}"
        if not self.current:
            return "starting"
        text = f"{self.collected} package{'s' if self.collected != 1 else ''} checked; {self.current}"
        if self.current_total:
            if self.current_done:
                percent = min(100, int(100 * self.current_done / self.current_total))
                text += f" {percent}% of {_size(self.current_total)}"
            else:
                text += f" ({_size(self.current_total)})"
        return text


@dataclass
class StepRunner:
    """Runs the install's pip steps with one progress line each, logging everything to ``log_path``."""

    log_path: Path | None
    total_steps: int
    dry_run: bool = False
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    popen: Callable[..., subprocess.Popen[str]] = subprocess.Popen
    prefix: str = "SD Studio: "
    number: int = 0

    def say(self, message: str) -> None:
        print(f"{self.prefix}{message}", file=self.out, flush=True)
        self._log(message)

    def _log(self, text: str) -> None:
        if self.log_path is None or self.dry_run:
            return
        with self.log_path.open("a", encoding="utf-8") as log:
            log.write(text.rstrip("\n") + "\n")

    def _is_terminal(self) -> bool:
        isatty = getattr(self.out, "isatty", None)
        return bool(isatty and isatty())

    def run(self, label: str, command: Sequence[str], *, count: bool = True) -> list[str]:
        """Run one pip step; return the packages pip installed. Raises :class:`StepFailedError`."""
        if count:
            self.number += 1
        head = f"[{self.number}/{self.total_steps}] {label}"
        if self.dry_run:
            print(f"{self.prefix}{head}", file=self.out, flush=True)
            print(f"{self.prefix}dry run, would run: {format_command(command)}", file=self.out, flush=True)
            return []
        self._log(f"\n===== {head}\n$ {format_command(command)}")
        terminal = self._is_terminal()
        if not terminal:
            print(f"{self.prefix}{head} ...", file=self.out, flush=True)
        started = time.monotonic()
        progress = _Progress()
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1"}
        process = self.popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            bufsize=1,
        )
        last_draw = 0.0
        width = 0
        assert process.stdout is not None
        with (
            process.stdout,
            self.log_path.open("a", encoding="utf-8") if self.log_path else _NullFile() as log,
        ):
            for line in process.stdout:
                log.write(line)
                if not _PROGRESS.search(line):
                    tail.append(line.rstrip())
                progress.feed(line)
                now = time.monotonic()
                if terminal and now - last_draw >= _REDRAW_EVERY_S:
                    last_draw = now
                    text = f"{self.prefix}{head}: {progress.status()}"[:119]
                    print("\r" + text.ljust(width), end="", file=self.out, flush=True)
                    width = len(text)
        code = process.wait()
        elapsed = _duration(time.monotonic() - started)
        if terminal:
            print("\r" + " " * width + "\r", end="", file=self.out, flush=True)
        if code != 0:
            print(
                f"{self.prefix}{head}: FAILED (pip exit code {code}, after {elapsed})",
                file=self.out,
                flush=True,
            )
            lines = list(tail)
            where = f"\nFull log: {self.log_path}" if self.log_path else ""
            message = (
                f"{head} failed. Last lines of pip's output:\n"
                + "\n".join(f"    {line}" for line in lines[-15:])
                + where
                + f"\n{failure_hint(lines)}"
            )
            raise StepFailedError(message, tail=lines, log_path=self.log_path)
        done = (
            f"{len(progress.installed)} package(s) installed" if progress.installed else "already up to date"
        )
        print(f"{self.prefix}{head}: done, {done} ({elapsed})", file=self.out, flush=True)
        return progress.installed


class _NullFile:
    def __enter__(self) -> _NullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, text: str) -> int:
        return len(text)


def dry_run_requested() -> bool:
    return os.environ.get(DRY_RUN_ENV, "") not in ("", "0")
