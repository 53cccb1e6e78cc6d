"""Writing results: A1111 names and folders, embedded infotext, atomic and race-free saves."""

from __future__ import annotations

import os
import threading
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from pipelines.outputs import saving as outputs
from pipelines.outputs.saving import (
    atomic_write_bytes,
    dated_output_dir,
    read_png_parameters,
    save_image_atomically,
)

INFOTEXT = (
    "a lighthouse, <lora:add_detail:0.5>\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 16x16"
)
UNICODE_INFOTEXT = "灯台, 嵐の海 — café\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 16x16"


def _image(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (16, 16), (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30))


def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_dated_output_dir_uses_a1111_layout(tmp_path: Path) -> None:
    when = datetime(2024, 3, 9, 23, 59)
    assert dated_output_dir(tmp_path, "txt2img", when) == tmp_path / "txt2img-images" / "2024-03-09"
    assert dated_output_dir(tmp_path, "img2img", when) == tmp_path / "img2img-images" / "2024-03-09"
    assert dated_output_dir(tmp_path, "extras", when) == tmp_path / "extras-images" / "2024-03-09"
    today = dated_output_dir(tmp_path, "txt2img")
    assert today.parent == tmp_path / "txt2img-images"
    assert len(today.name) == len("YYYY-MM-DD")
    assert not today.exists()  # only computed; saving creates it


@pytest.mark.parametrize("bad_mode", ["", "../etc", "txt2img/x", ".hidden"])
def test_dated_output_dir_rejects_path_like_modes(tmp_path: Path, bad_mode: str) -> None:
    with pytest.raises(ValueError, match="mode"):
        dated_output_dir(tmp_path, bad_mode)


def test_save_names_continue_from_highest_number(tmp_path: Path) -> None:
    directory = tmp_path / "txt2img-images" / "2024-03-09"
    first = save_image_atomically(_image(), directory, seed=42, infotext=INFOTEXT)
    assert first == directory / "00000-42.png"
    second = save_image_atomically(_image(), directory, seed=7, infotext=INFOTEXT)
    assert second.name == "00001-7.png"

    # Files from A1111 (or copied in by hand) set the counter; other names are ignored.
    (directory / "00041-123456.png").write_bytes(b"x")
    (directory / "notes.txt").write_text("hello")
    (directory / "grid-0099.png").write_bytes(b"x")
    third = save_image_atomically(_image(), directory, seed=3, infotext=INFOTEXT)
    assert third.name == "00042-3.png"
    assert _listing(directory) == [
        "00000-42.png",
        "00001-7.png",
        "00041-123456.png",
        "00042-3.png",
        "grid-0099.png",
        "notes.txt",
    ]


def test_png_keeps_infotext_in_parameters_chunk(tmp_path: Path) -> None:
    path = save_image_atomically(_image(), tmp_path, seed=1, infotext=UNICODE_INFOTEXT)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (16, 16)
        assert image.info["parameters"] == UNICODE_INFOTEXT
        assert read_png_parameters(image) == UNICODE_INFOTEXT
    assert read_png_parameters(path) == UNICODE_INFOTEXT
    assert read_png_parameters(str(path)) == UNICODE_INFOTEXT


@pytest.mark.parametrize(("extension", "image_format"), [("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_formats_keep_infotext_in_exif_user_comment(
    tmp_path: Path, extension: str, image_format: str
) -> None:
    path = save_image_atomically(
        _image("RGBA"), tmp_path, seed=9, infotext=UNICODE_INFOTEXT, extension=extension
    )
    assert path.name == f"00000-9.{extension}"
    with Image.open(path) as image:
        assert image.format == image_format
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\x00")  # what A1111 (piexif) writes
    assert read_png_parameters(path) == UNICODE_INFOTEXT


def test_read_png_parameters_without_metadata_is_none(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    _image().save(plain)
    assert read_png_parameters(plain) is None
    assert read_png_parameters(_image()) is None
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png"):
        read_png_parameters(not_an_image)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"UNICODE\x00" + "héllo".encode("utf-16-be"), "héllo"),
        (b"UNICODE\x00" + "\ufeffhéllo".encode("utf-16-le"), "héllo"),
        (b"ASCII\x00\x00\x00plain text\x00", "plain text"),
        (b"\x00" * 8 + "utf8 ünïcode".encode(), "utf8 ünïcode"),
        (b"UNICODE\x00", None),
    ],
)
def test_user_comment_decoding(payload: bytes, expected: str | None) -> None:
    assert outputs._decode_user_comment(payload) == expected


def test_unsupported_extension_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extension"):
        save_image_atomically(_image(), tmp_path / "out", seed=1, infotext=INFOTEXT, extension="gif")
    assert not (tmp_path / "out").exists()


def test_concurrent_saves_get_distinct_numbers(tmp_path: Path) -> None:
    directory = tmp_path / "concurrent"
    threads = 8
    barrier = threading.Barrier(threads)
    results: list[Path] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        try:
            barrier.wait()
            # Half share a seed (same final name pattern), half differ: numbers must differ anyway.
            path = save_image_atomically(_image(), directory, seed=index % 2, infotext=INFOTEXT)
            with lock:
                results.append(path)
        except BaseException as exc:  # collected and re-raised in the main thread
            with lock:
                errors.append(exc)

    workers = [threading.Thread(target=worker, args=(index,)) for index in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    assert errors == []
    assert len(set(results)) == threads
    counters = sorted(int(path.name.split("-")[0]) for path in results)
    assert counters == list(range(threads))
    assert _listing(directory) == sorted(path.name for path in results)  # no temp files or markers
    for path in results:
        assert read_png_parameters(path) == INFOTEXT


def test_number_released_by_a_finished_writer_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that scanned before another finished must notice the finished file and move on."""
    (tmp_path / "00000-5.png").write_bytes(b"done")
    real_numbers_in = outputs._numbers_in
    calls = {"count": 0}

    def stale_first_scan(directory: Path) -> tuple[set[int], set[int]]:
        calls["count"] += 1
        if calls["count"] == 1:
            return set(), set()
        return real_numbers_in(directory)

    monkeypatch.setattr(outputs, "_numbers_in", stale_first_scan)
    path = save_image_atomically(_image(), tmp_path, seed=6, infotext=INFOTEXT)
    assert path.name == "00001-6.png"
    assert _listing(tmp_path) == ["00000-5.png", "00001-6.png"]


def test_stale_reservation_marker_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "00002-1.png").write_bytes(b"x")
    (tmp_path / ".00003.reserved").write_bytes(b"")  # left by a crashed process
    path = save_image_atomically(_image(), tmp_path, seed=8, infotext=INFOTEXT)
    assert path.name == "00004-8.png"


def test_encoder_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "out"
    directory.mkdir()
    image = _image()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("encoder exploded")

    monkeypatch.setattr(image, "save", broken_save)
    with pytest.raises(OSError, match="encoder exploded"):
        save_image_atomically(image, directory, seed=1, infotext=INFOTEXT)
    assert _listing(directory) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_write_failure_removes_temp_file_and_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    directory = tmp_path / "out"
    save_image_atomically(_image(), directory, seed=1, infotext=INFOTEXT)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(f"{failing} failed: disk full")

    monkeypatch.setattr(outputs.os, failing, broken)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomically(_image(), directory, seed=2, infotext=INFOTEXT)
    monkeypatch.undo()
    assert _listing(directory) == ["00000-1.png"]
    # The number was not burnt: the next save gets it.
    assert save_image_atomically(_image(), directory, seed=3, infotext=INFOTEXT).name == "00001-3.png"


def test_atomic_write_bytes_replaces_whole_file_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "deeper" / "sidecar.json"
    atomic_write_bytes(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    atomic_write_bytes(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert _listing(target.parent) == ["sidecar.json"]


def test_atomic_write_bytes_failure_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "video.mp4"
    target.write_bytes(b"old")

    def broken_replace(*args: object, **kwargs: object) -> None:
        raise PermissionError("file is open in another program")

    monkeypatch.setattr(outputs.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["video.mp4"]


def test_saved_files_follow_the_umask_not_mkstemp_0600(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        path = save_image_atomically(_image(), tmp_path, seed=1, infotext=INFOTEXT)
    finally:
        os.umask(umask)
    # Windows only reports read-only or not; POSIX must give the usual rw-r--r--.
    assert path.stat().st_mode & 0o777 == (0o666 if os.name == "nt" else 0o644)
