"""Issue 12 without a browser: inputs refused at submit with the field named, the CLI refusing a
missing file before any model work, the image browser's rules, the browser-held job owner, the
``--listen`` start-up lines and the Talking head checklist."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from pydantic import ValidationError

from contract.image_inputs import ImageFieldError, check_image_input, describe_content
from contract.images import ExtrasRequest, Img2ImgRequest

ROOT = Path(__file__).resolve().parent.parent


def _png(path: Path, size: tuple[int, int] = (16, 16), text: str | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text:
        info.add_text("parameters", text)
    Image.new("RGB", size, (200, 10, 10)).save(path, pnginfo=info)
    return path


def test_every_kind_of_bad_image_is_named(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("shopping list")
    with pytest.raises(ImageFieldError, match=r"^init image: not an image file \(text/plain\)$"):
        check_image_input("init image", str(text))
    with pytest.raises(ImageFieldError, match=r"^mask: file not found: nothere\.png$"):
        check_image_input("mask", "nothere.png")
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64
    assert describe_content(heic) == "image/heic"
    with pytest.raises(ImageFieldError, match="HEIC image, which this studio's decoder cannot read"):
        check_image_input("image", base64.b64encode(heic).decode())
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    noisy.save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    with pytest.raises(ImageFieldError, match="truncated"):
        check_image_input("image", "data:image/png;base64," + base64.b64encode(whole[:150]).decode())
    with pytest.raises(ImageFieldError, match="is a folder"):
        check_image_input("image", str(tmp_path))
    check_image_input("image", str(tmp_path / "whole.png"))  # a picture passes
    # the API never opens a path it was sent (it refuses paths itself)
    check_image_input("image", "/etc/passwd", read_files=False)


def test_requests_refuse_bad_images_when_built(tmp_path: Path) -> None:
    text = tmp_path / "fake.png"
    text.write_text("not a picture")
    with pytest.raises(ValidationError, match=r"init_images\.0: not an image file \(text/plain\)"):
        Img2ImgRequest(prompt="x", init_images=[str(text)])
    with pytest.raises(ValidationError, match=r"image: file not found: gone\.png"):
        ExtrasRequest(image="gone.png")


def test_cli_names_a_missing_input_before_any_model_work(tmp_path: Path) -> None:
    """With an empty models folder, loading anything would end in the 'no checkpoint' advice: the
    input error comes first, so no model was looked for, let alone loaded."""
    env = {**os.environ, "SDSTUDIO_SKIP_VENV": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--models-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        [sys.executable, "launch.py", "generate", "--init-images", "nothere.png", "--prompt", "x", *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "--init-images: file not found: nothere.png" in done.stderr
    assert "checkpoint" not in (done.stdout + done.stderr).lower()
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    done = subprocess.run(
        [sys.executable, "launch.py", "generate", "--image", str(fake), *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--image: not an image file (text/plain)" in done.stderr


def test_output_library_pages_searches_and_deletes_only_inside_outputs(tmp_path: Path) -> None:
    from app.output_library import OutputAccessError, OutputLibrary

    outputs = tmp_path / "outputs"
    day = outputs / "txt2img-images" / "2026-12-05"
    day.mkdir(parents=True)
    for index in range(30):
        path = _png(day / f"{index:05d}-1.png", text=f"a {'barn' if index == 7 else 'field'}\nSteps: 2")
        os.utime(path, (1_000_000 + index, 1_000_000 + index))
    (outputs / ".batch-state").mkdir()
    _png(outputs / ".batch-state" / "hidden.png")
    outside = _png(tmp_path / "outside.png")
    library = OutputLibrary(outputs, tmp_path / "thumbs")
    images = library.scan()
    assert len(images) == 30 and images[0].name == "00029-1.png"  # newest first, hidden skipped
    assert library.folders(images) == ["txt2img-images"] and library.days(images) == ["2026-12-05"]
    first = library.page(images, per_page=24)
    assert (first.page, first.pages, first.total, len(first.images)) == (1, 2, 30, 24)
    assert len(library.page(images, page=2, per_page=24).images) == 6
    found = library.page(images, search="BARN")
    assert [image.name for image in found.images] == ["00007-1.png"]
    assert library.thumbnail(images[0].path).size == (16, 16)
    assert len(list((tmp_path / "thumbs").rglob("*.webp"))) == 1
    with pytest.raises(OutputAccessError):
        library.delete(outside)
    with pytest.raises(OutputAccessError):
        library.delete(day / ".." / ".." / ".." / "outside.png")
    with pytest.raises(OutputAccessError, match="not one of yours"):
        library.delete(images[0].path, visible=lambda path: False)
    assert outside.exists()
    library.delete(images[0].path)
    assert not images[0].path.exists()


def test_job_owner_prefers_login_then_the_browser_id() -> None:
    from app.ui.job_runner import job_owner

    kept = "0123456789abcdef0123456789abcdef"
    assert job_owner(SimpleNamespace(username="alice", cookies={"sdstudio_browser": kept})) == "alice"
    browser = SimpleNamespace(username=None, cookies={"sdstudio_browser": kept}, session_hash="s1")
    assert job_owner(browser) == f"browser-{kept}"
    forged = SimpleNamespace(username=None, cookies={"sdstudio_browser": "../../x"}, session_hash="s1")
    assert job_owner(forged) == "session-s1"


def test_listen_prints_lan_urls_and_the_warning_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from app import server
    from app.settings import StudioSettings

    monkeypatch.setattr(server, "lan_addresses", lambda: ["192.168.1.20", "10.0.0.5"])
    lines = server.startup_announcement(StudioSettings(listen=True, port=7861), ui_open=True, api_open=False)
    assert "  http://192.168.1.20:7861" in lines and "  http://10.0.0.5:7861" in lines
    assert not any("0.0.0.0" in line for line in lines)
    assert lines[-1].startswith("WARNING: --listen without --auth")
    quiet = server.startup_announcement(StudioSettings(port=7861), ui_open=True, api_open=False)
    assert not any("WARNING" in line for line in quiet)
    assert all(not address.startswith("127.") for address in server.lan_addresses())


def test_talking_head_checklist_names_every_missing_file(tmp_path: Path) -> None:
    from app.ui.talking_head_tab import model_files_checklist

    text = model_files_checklist(tmp_path)
    assert "3 of 3 required file(s) missing" in text
    (tmp_path / "SadTalker").mkdir()
    (tmp_path / "SadTalker" / "mapping_00229-model.pth.tar").write_bytes(b"x")
    text = model_files_checklist(tmp_path)
    assert "2 of 3 required" in text and "`mapping_00229-model.pth.tar` (head motion for crop" in text
    assert text.count("--kind SadTalker --file") == 3  # two required + the optional 512 px file
