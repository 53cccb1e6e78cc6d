# ruff: noqa: F811 (pytest fixtures imported below are requested by parameters of the same name)
"""The Talking head tab in headless Chromium: portrait + speech -> a video in the player, "Send to
talking head" from the txt2img gallery, and a file that is not audio -> a readable message.

The studio runs in its own process (``tests/ui/talking_head_server.py``: ``launch.py`` with the cheap
stand-in for the face generator, see there why) over a models folder holding the tiny SD1 checkpoint
and the random-weight SadTalker files. Screenshots: ``test-artifacts/ui/talking_head-*.png``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The talking-head fixtures, shared with tests/sadtalker (imported fixtures are used by parameter name).
from tests.sadtalker.conftest import astronaut_png, media_dir, sadtalker_models_root, speech_wav  # noqa: F401
from tests.server_process import studio_process
from tests.ui.conftest import USERS, RunningStudio
from tests.ui.pages import LONG, StudioPage

TAB = "talking_head"


@pytest.fixture(scope="module")
def talking_head_models(
    tiny_models_root: Path, sadtalker_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny SD1 checkpoint (for txt2img) and the SadTalker files, linked into one models folder."""
    root = tmp_path_factory.mktemp("talking-head-ui-models")
    (root / "Stable-diffusion").mkdir()
    for source in (tiny_models_root / "Stable-diffusion").glob("tiny-sd1.*"):
        (root / "Stable-diffusion" / source.name).symlink_to(source)
    (root / "SadTalker").symlink_to(sadtalker_models_root / "SadTalker", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def studio_server(
    talking_head_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStudio]:
    work = tmp_path_factory.mktemp("talking-head-ui")
    args = [
        *("--models-dir", str(talking_head_models), "--data-dir", str(work / "data")),
        *("--outputs-dir", str(work / "outputs"), "--ckpt", "tiny-sd1", "--auth", f"alice:{USERS['alice']}"),
    ]
    with studio_process(args, work, entry=("-m", "tests.ui.talking_head_server")) as (url, log):
        yield RunningStudio(url=url, work=work, log=log)


@pytest.fixture
def alice(browser: Any, studio_server: RunningStudio) -> Iterator[StudioPage]:
    page = StudioPage.open(browser, studio_server.url, "alice", USERS["alice"])
    yield page
    page.close()


class TalkingHeadTab:
    """Selectors of the tab (elem_ids from ``app/ui/talking_head_tab.py``)."""

    def __init__(self, studio: StudioPage) -> None:
        self.studio = studio
        self.page = studio.page

    def open(self) -> None:
        self.studio.open_tab(TAB)
        self.page.locator("#talking_head_generate").wait_for(state="visible")

    def upload_portrait(self, path: Path) -> None:
        self.studio.upload("talking_head_image", path)

    def upload_audio(self, path: Path) -> None:
        self.page.locator("#talking_head_audio input[type=file]").set_input_files(str(path))

    def wait_audio_loaded(self) -> None:
        self.page.locator(
            "#talking_head_audio audio, #talking_head_audio [data-testid=waveform-x]"
        ).first.wait_for(state="attached", timeout=LONG)

    def status(self) -> str:
        return self.page.locator("#talking_head_status").inner_text().strip()

    def wait_status(self, pattern: str) -> str:
        self.page.wait_for_function(
            "(rx) => new RegExp(rx).test("
            "(document.querySelector('#talking_head_status')?.innerText || '').trim())",
            arg=pattern,
            timeout=LONG,
        )
        return self.status()


def test_portrait_and_speech_become_a_video_in_the_player(
    alice: StudioPage,
    studio_server: RunningStudio,
    astronaut_png: Path,
    speech_wav: Path,
    artifacts: Path,
) -> None:
    tab = TalkingHeadTab(alice)
    tab.open()
    tab.upload_portrait(astronaut_png)
    tab.upload_audio(speech_wav)
    tab.wait_audio_loaded()
    alice.set_number("talking_head_pose_style", 5)
    alice.set_number("talking_head_batch_size", 8)
    alice.set_number("talking_head_seed", 42)
    alice.page.locator("#talking_head_still input[type=checkbox]").check()
    alice.click("talking_head_generate")
    final = tab.wait_status(r"^(Done|\*?\*?(failed|cancelled))")
    assert final.startswith("Done"), final
    player = alice.page.locator("#talking_head_video video")
    player.wait_for(state="visible", timeout=LONG)
    assert player.get_attribute("src")
    alice.page.wait_for_function(
        "document.querySelector('#talking_head_video video').readyState >= 1", timeout=LONG
    )
    duration = alice.page.evaluate("document.querySelector('#talking_head_video video').duration")
    assert 1.0 < duration < 3.0, duration  # the ~1.5 s of speech
    videos = list((studio_server.outputs / "talking-head").glob("*.mp4"))
    assert len(videos) == 1 and final.endswith(f"talking-head/{videos[0].name}")
    assert "Traceback" not in alice.page.content()
    alice.screenshot(artifacts / "talking_head-result.png")


def test_send_to_talking_head_from_the_txt2img_gallery(alice: StudioPage, artifacts: Path) -> None:
    alice.small_job("txt2img", "a portrait of a lighthouse keeper")
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    alice.click("txt2img_send_to_talking_head")
    portrait = alice.page.locator("#talking_head_image img")
    portrait.wait_for(state="visible", timeout=LONG)
    assert alice.page.locator("#talking_head_generate").is_visible()  # the tab was switched to
    assert portrait.get_attribute("src")
    alice.screenshot(artifacts / "talking_head-sent.png")


def test_a_file_that_is_not_audio_gives_a_readable_error(
    alice: StudioPage, studio_server: RunningStudio, astronaut_png: Path, tmp_path: Path, artifacts: Path
) -> None:
    not_audio = tmp_path / "speech.wav"  # named like audio, so the browser lets it in
    not_audio.write_text("these are words, not a recording\n" * 20)
    tab = TalkingHeadTab(alice)
    tab.open()
    tab.upload_portrait(astronaut_png)
    tab.upload_audio(not_audio)
    alice.click("talking_head_generate")
    final = tab.wait_status(r"^(Done|\*?\*?(failed|cancelled))")
    assert final.startswith("failed"), final
    assert "could not be read as audio" in final and "Choose a speech recording" in final, final
    assert "Traceback" not in alice.page.content()
    assert "Traceback" not in studio_server.log.read_text()
    alice.screenshot(artifacts / "talking_head-error.png")
