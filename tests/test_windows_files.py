"""Windows rules, tested with Windows faked: the locked-file retry of atomic writes, file names Windows
accepts (outputs never use a name it refuses), and the download's free-space check."""

from __future__ import annotations

import errno
from collections import namedtuple
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from pipelines.outputs import windows_files
from pipelines.outputs.saving import atomic_write_bytes, dated_output_dir, save_image_atomically
from pipelines.outputs.windows_files import (
    REPLACE_DELAYS_S,
    is_valid_windows_name,
    replace_with_retry,
    windows_safe_name,
)


def locked_then_free(times_locked: int):
    calls: list[tuple[Path, Path]] = []

    def replace(source: Path, destination: Path) -> None:
        calls.append((source, destination))
        if len(calls) <= times_locked:
            raise PermissionError(errno.EACCES, "The process cannot access the file", str(destination))
        source.rename(destination)

    return replace, calls


def test_locked_destination_is_retried_on_windows(tmp_path: Path) -> None:
    source, destination = tmp_path / "a.tmp", tmp_path / "a.png"
    source.write_bytes(b"new")
    replace, calls = locked_then_free(3)
    pauses: list[float] = []
    replace_with_retry(source, destination, is_windows=True, sleep=pauses.append, replace=replace)
    assert destination.read_bytes() == b"new"
    assert len(calls) == 4 and pauses == list(REPLACE_DELAYS_S[:3])


def test_a_lock_that_stays_says_what_to_close(tmp_path: Path) -> None:
    replace, calls = locked_then_free(100)
    with pytest.raises(PermissionError, match="another program keeps it open"):
        replace_with_retry(
            tmp_path / "a", tmp_path / "b", is_windows=True, sleep=lambda s: None, replace=replace
        )
    assert len(calls) == len(REPLACE_DELAYS_S) + 1


def test_posix_permission_errors_are_not_retried(tmp_path: Path) -> None:
    replace, calls = locked_then_free(1)
    with pytest.raises(PermissionError):
        replace_with_retry(
            tmp_path / "a", tmp_path / "b", is_windows=False, sleep=lambda s: None, replace=replace
        )
    assert len(calls) == 1


def test_atomic_write_survives_a_briefly_locked_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "00001-42.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    real_replace = windows_files.os.replace
    attempts: list[int] = []

    def image_viewer_holds_it(source: str, destination: str) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise PermissionError(errno.EACCES, "locked", destination)
        real_replace(source, destination)

    monkeypatch.setattr(windows_files, "running_on_windows", lambda: True)
    monkeypatch.setattr(windows_files.os, "replace", image_viewer_holds_it)
    monkeypatch.setattr(windows_files.time, "sleep", lambda seconds: None)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert len(attempts) == 3
    assert [p.name for p in target.parent.iterdir()] == ["00001-42.png"]  # no temp file left behind


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("00001-42.png", True),
        ("txt2img-images", True),
        ("2026-01-31", True),
        ("a:b.png", False),
        ("CON", False),
        ("con.png", False),
        ("NUL.txt", False),
        ("COM1.safetensors", False),
        ("LPT9", False),
        ("CONSOLE.png", True),
        ("trailing.", False),
        ("trailing ", False),
        ("what?.png", False),
        ('say "hi".png', False),
        ("tab\there", False),
    ],
)
def test_windows_name_rules(name: str, valid: bool) -> None:
    assert is_valid_windows_name(name) is valid
    assert is_valid_windows_name(windows_safe_name(name))
    if valid:
        assert windows_safe_name(name) == name


def test_output_names_and_folders_are_valid_on_windows(tmp_path: Path) -> None:
    folder = dated_output_dir(tmp_path, "txt2img", datetime(2026, 1, 31, 23, 59))
    assert all(is_valid_windows_name(part) for part in folder.relative_to(tmp_path).parts)
    path = save_image_atomically(Image.new("RGB", (4, 4)), folder, seed=4294967295, infotext="a: b, c: d")
    assert is_valid_windows_name(path.name)
    with pytest.raises(ValueError):
        dated_output_dir(tmp_path, "a:b")  # a mode from user input can never name a folder with ':'


def test_talking_head_names_from_user_files_are_valid_on_windows() -> None:
    from sadtalker.engine import _safe_stem

    for stem in ("CON", "nul", "a:b", "portrait?", "é portrait"):
        name = f"20260131-235900-{_safe_stem(stem)}-42.mp4"
        assert is_valid_windows_name(name), name


Usage = namedtuple("Usage", "total used free")


def test_download_refuses_what_cannot_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pipelines.models import download

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(download.DownloadError) as failure:
        download._check_free_space(tmp_path / "model.safetensors", 7 * 10**9, "owner/model")
    message = str(failure.value)
    assert "needs 7.00 GB more" in message and "1.00 GB are free" in message and str(tmp_path) in message
    download._check_free_space(tmp_path / "small.safetensors", 10**8, "owner/model")
