"""What an artist trips over in the first hour (issue 12), driven in headless Chromium: work that
comes back after a reload, the Image Browser, Interrupt that keeps the picture, named errors for
files that are not pictures, LoRA cards, and the Talking head tab's file checklist."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import studio_process
from tests.ui.conftest import USERS, RunningStudio
from tests.ui.pages import LONG, StudioPage


@pytest.fixture(scope="module")
def first_hour_server(
    tiny_models_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStudio]:
    """The studio with two LoRA files (one for SD1, one for SDXL, one with a preview picture)."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("first-hour")
    (work / "users.txt").write_text("bob:builder\n", encoding="utf-8")
    loras = work / "Lora"
    loras.mkdir()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(8, 4)},
        str(loras / "ink-style.safetensors"),
        metadata={"ss_tag_frequency": '{"set": {"ink wash": 9, "brush": 4}}'},
    )
    Image.new("RGB", (64, 64), (30, 90, 200)).save(loras / "ink-style.preview.png")
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(8, 4)},
        str(loras / "xl-detail.safetensors"),
    )
    args = [
        *("--models-dir", str(tiny_models_root), "--data-dir", str(work / "data")),
        *("--outputs-dir", str(work / "outputs"), "--ckpt", "tiny-sd1", "--lora-dir", str(loras)),
        *("--auth", "alice:wonderland", "--auth-file", str(work / "users.txt")),
    ]
    with studio_process(args, work) as (url, log):
        yield RunningStudio(url=url, work=work, log=log)


def _open(browser: Any, studio: RunningStudio, user: str = "alice") -> StudioPage:
    return StudioPage.open(browser, studio.url, user, USERS[user])


@pytest.fixture
def alice(browser: Any, first_hour_server: RunningStudio) -> Iterator[StudioPage]:
    page = _open(browser, first_hour_server)
    yield page
    page.close()


def _upload_any(page: StudioPage, elem_id: str, path: Path) -> None:
    """Upload a file that may not be a picture (so no thumbnail is waited for)."""
    with page.page.expect_response(re.compile(r"/gradio_api/upload")):
        page.page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


def test_reload_brings_back_the_last_job_and_its_results(
    alice: StudioPage, first_hour_server: RunningStudio, artifacts: Path
) -> None:
    alice.small_job("txt2img", "a lighthouse at dusk")
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    alice.page.reload()
    alice.page.wait_for_selector("#txt2img_prompt textarea", timeout=LONG)
    text = alice.wait_for_progress("txt2img", r"^Your last job")
    assert re.fullmatch(r"Your last job \(\d\d:\d\d, done\): 1 image", text), text
    alice.page.locator("#txt2img_gallery img").first.wait_for(timeout=LONG)
    assert alice.infotext("txt2img").startswith("a lighthouse at dusk\n")
    alice.screenshot(artifacts / "first-hour-reload-restores-results.png")
    alice.open_tab("queue")
    alice.page.wait_for_function(
        "() => (document.querySelector('#queue_mine')?.innerText || '').includes('a lighthouse at dusk')",
        timeout=LONG,
    )


def test_interrupt_keeps_the_partly_denoised_picture(alice: StudioPage) -> None:
    alice.small_job("txt2img", "a slow harbour", steps=150)
    alice.generate("txt2img")
    alice.wait_for_progress("txt2img", r"^Step ([2-9]|\d\d+)/150")
    alice.click("txt2img_interrupt")
    assert alice.wait_finished("txt2img") == "Interrupted (1 image kept)"
    alice.page.locator("#txt2img_gallery img").first.wait_for(timeout=LONG)
    assert re.search(r"Interrupted: at step \d+ of 150", alice.infotext("txt2img"))


def test_image_browser_pages_searches_sends_and_deletes(
    alice: StudioPage, browser: Any, first_hour_server: RunningStudio, artifacts: Path
) -> None:
    alice.small_job("txt2img", "a field of poppies", steps=1)
    alice.set_number("txt2img_batch_size", 8)
    alice.set_number("txt2img_batch_count", 3)
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 24 images"
    alice.set_number("txt2img_batch_size", 1)
    alice.set_number("txt2img_batch_count", 1)
    alice.small_job("txt2img", "a red barn in snow", steps=1)
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"

    page = alice.page
    page.get_by_role("tab", name="Image Browser", exact=True).click()
    info = page.locator("#browser_page_info")
    info.get_by_text(re.compile(r"Page 1 of 2 · 2\d pictures")).wait_for(timeout=LONG)
    assert page.locator("#browser_gallery img").count() == 24
    alice.screenshot(artifacts / "first-hour-image-browser.png")
    alice.click("browser_next")
    info.get_by_text(re.compile(r"Page 2 of 2")).wait_for(timeout=LONG)

    alice.set_text("browser_search", "barn")
    page.locator("#browser_search textarea, #browser_search input").first.press("Enter")
    info.get_by_text("Page 1 of 1 · 1 picture").wait_for(timeout=LONG)
    page.locator("#browser_gallery img").first.click()
    page.wait_for_function(
        "() => document.querySelector('#browser_infotext textarea').value.startsWith('a red barn in snow')"
    )
    assert page.locator("#browser_open_file").get_attribute("href").startswith("/gradio_api/file=")
    alice.screenshot(artifacts / "first-hour-image-browser-picked.png")

    alice.click("browser_send_to_txt2img")
    page.wait_for_function(
        "() => document.querySelector('#txt2img_prompt textarea').value === 'a red barn in snow'"
    )

    # bob (another login) sees none of alice's pictures
    bob = _open(browser, first_hour_server, "bob")
    try:
        bob.page.get_by_role("tab", name="Image Browser", exact=True).click()
        bob.page.locator("#browser_page_info").get_by_text("No pictures here yet").wait_for(timeout=LONG)
    finally:
        bob.close()

    alice.open_tab("txt2img")
    page.get_by_role("tab", name="Image Browser", exact=True).click()
    page.locator("#browser_gallery img").first.click()
    alice.click("browser_delete")
    page.locator("#browser_confirm_text").get_by_text("cannot be undone").wait_for()
    barns = [
        p for p in first_hour_server.outputs.rglob("*.png") if "red barn" in p.read_bytes().decode("latin-1")
    ]
    assert len(barns) == 1
    alice.click("browser_confirm")
    page.locator("#browser_message").get_by_text("Deleted").wait_for(timeout=LONG)
    assert not barns[0].exists()
    info.get_by_text("No pictures").wait_for(timeout=LONG)  # the search still says "barn"


@pytest.mark.parametrize(
    ("subtab", "elem_id", "field"),
    [
        (None, "img2img_image", "init image"),
        ("Inpaint upload", "img2img_inpaint_base", "inpaint image"),
    ],
)
def test_a_text_file_named_png_gives_a_named_error_in_img2img(
    alice: StudioPage, tmp_path: Path, subtab: str | None, elem_id: str, field: str
) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("this is a shopping list, not a picture")
    alice.open_tab("img2img")
    if subtab:
        alice.open_subtab(subtab)
    _upload_any(alice, elem_id, fake)
    alice.small_job("img2img", "anything")
    alice.generate("img2img")
    text = alice.wait_finished("img2img")
    assert text == f"Error: {field} (fake.png): not an image file (text/plain)", text


def test_a_text_file_named_png_gives_a_named_error_in_extras_and_controlnet(
    alice: StudioPage, tmp_path: Path, artifacts: Path
) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("<html><body>login required</body></html>")
    alice.open_tab("extras")
    _upload_any(alice, "extras_image", fake)
    alice.generate("extras")
    text = alice.wait_finished("extras")
    assert text.startswith("Error: Extras source image (fake.png): not an image file (text/html"), text
    alice.screenshot(artifacts / "first-hour-named-upload-error.png")

    alice.open_tab("txt2img")
    alice.page.locator("#txt2img_controlnet, #txt2img_cn0_image").first.scroll_into_view_if_needed()
    accordion = alice.page.get_by_text("ControlNet", exact=False).first
    if not alice.page.locator("#txt2img_cn0_image").is_visible():
        accordion.click()
    _upload_any(alice, "txt2img_cn0_image", fake)
    alice.page.locator("#txt2img_cn0_enabled input").check()
    alice.small_job("txt2img", "anything")
    alice.generate("txt2img")
    text = alice.wait_finished("txt2img")
    assert text.startswith("Error: ControlNet Unit 0 control image (fake.png): not an image file"), text


def test_lora_card_click_inserts_the_tag_at_the_cursor(alice: StudioPage, artifacts: Path) -> None:
    page = alice.page
    alice.set_text("txt2img_prompt", "a cat, watercolour")
    page.locator("#txt2img_networks").get_by_text("Extra Networks", exact=False).first.click()
    card = page.locator("#txt2img_lora_cards .sd-card[data-name='ink-style']")
    card.wait_for(timeout=LONG)
    assert "SD1.x" in card.inner_text() and "ink wash" in card.inner_text()
    assert card.locator("img").count() == 1  # its .preview.png
    other = page.locator("#txt2img_lora_cards .sd-card[data-name='xl-detail']")
    assert "made for SDXL" in other.inner_text()
    alice.screenshot(artifacts / "first-hour-lora-cards.png")
    box = page.locator("#txt2img_prompt textarea")
    box.click()
    box.evaluate("(el) => el.setSelectionRange(5, 5)")  # after "a cat"
    card.click()
    assert box.input_value() == "a cat <lora:ink-style:1>, watercolour"
    alice.set_text("txt2img_networks_search", "detail")
    page.locator("#txt2img_networks_search textarea, #txt2img_networks_search input").first.press("Enter")
    page.locator("#txt2img_lora_cards .sd-card[data-name='ink-style']").wait_for(state="detached")


def test_checkpoint_card_click_switches_the_tabs_checkpoint(alice: StudioPage, artifacts: Path) -> None:
    """As in A1111, clicking a checkpoint card selects that model (the tab's checkpoint dropdown, which
    the next job loads); the LoRA cards are then judged against the new model's family."""
    page = alice.page
    dropdown = page.locator("#txt2img_checkpoint input")
    assert dropdown.input_value() == "tiny-sd1.safetensors"
    page.locator("#txt2img_networks").get_by_text("Extra Networks", exact=False).first.click()
    page.locator("#txt2img_networks").get_by_role("tab", name="Checkpoints").click()
    current = page.locator("#txt2img_checkpoint_cards .sd-card[data-name='tiny-sd1']")
    current.wait_for(timeout=LONG)
    assert "in use" in current.inner_text()
    alice.screenshot(artifacts / "first-hour-checkpoint-cards.png")
    page.locator("#txt2img_checkpoint_cards .sd-card[data-name='tiny-sdxl']").click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_checkpoint input').value === 'tiny-sdxl.safetensors'",
        timeout=LONG,
    )
    chosen = page.locator("#txt2img_checkpoint_cards .sd-card-selected[data-name='tiny-sdxl']")
    chosen.wait_for(timeout=LONG)
    assert "in use" in chosen.inner_text()
    page.locator("#txt2img_networks").get_by_role("tab", name="LoRA").click()
    sd1_lora = page.locator("#txt2img_lora_cards .sd-card[data-name='ink-style']")
    page.wait_for_function(
        "() => (document.querySelector(\"#txt2img_lora_cards .sd-card[data-name='ink-style']\")"
        "?.innerText || '').includes('made for SD1.x')",
        timeout=LONG,
    )
    assert "made for SD1.x" in sd1_lora.inner_text()


def test_talking_head_tab_lists_every_missing_file_first(alice: StudioPage, artifacts: Path) -> None:
    alice.open_tab("talking_head")
    checklist = alice.page.locator("#talking_head_files")
    checklist.get_by_text("3 of 3 required file(s) missing", exact=False).wait_for(timeout=LONG)
    text = checklist.inner_text()
    for name in (
        "SadTalker_V0.0.2_256.safetensors",
        "mapping_00229-model.pth.tar",
        "mapping_00109-model.pth.tar",
    ):
        assert name in text
        assert f"--kind SadTalker --file {name}" in text
    alice.screenshot(artifacts / "first-hour-talking-head-checklist.png")
