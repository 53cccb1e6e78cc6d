"""Browser tests: a user's day in the studio, in headless Chromium against ``launch.py``.

One studio process serves the whole module (tiny SD1 model, 64x64, 2 steps). Tests run in file
order and the first one is the first job of the process, so it sees the model load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import USERS, RunningStudio
from tests.ui.pages import LONG, StudioPage


def _open(browser: Any, studio: RunningStudio, user: str = "alice") -> StudioPage:
    return StudioPage.open(browser, studio.url, user, USERS[user])


@pytest.fixture
def alice(browser: Any, studio_server: RunningStudio) -> Any:
    page = _open(browser, studio_server, "alice")
    yield page
    page.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64x64 photo-like gradient and a mask with a white square in the middle."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("pictures")
    image = Image.new("RGB", (64, 64))
    image.putdata([(4 * x, 4 * y, 128) for y in range(64) for x in range(64)])
    image.save(folder / "source.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    mask.save(folder / "mask.png")
    return {"source": folder / "source.png", "mask": folder / "mask.png"}


def test_txt2img_shows_loading_then_the_image_and_its_infotext(alice: StudioPage, artifacts: Path) -> None:
    alice.small_job("txt2img", "a lighthouse at dusk")
    alice.set_number("txt2img_seed", 1234)
    alice.record_progress("txt2img")
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    assert alice.gallery_images("txt2img") >= 1
    infotext = alice.infotext("txt2img")
    assert infotext.startswith("a lighthouse at dusk\nSteps: 2, Sampler: Euler a")
    assert "Seed: 1234, Size: 64x64" in infotext
    assert any(text.startswith("Loading model") for text in alice.progress_log("txt2img")), (
        alice.progress_log("txt2img")
    )
    alice.screenshot(artifacts / "txt2img-result.png")
    # ♻️ brings back the last seed, 🎲 goes back to random
    alice.set_number("txt2img_seed", 5)
    alice.click("txt2img_reuse_seed")
    alice.page.wait_for_function("document.querySelector('#txt2img_seed input').value === '1234'")
    alice.click("txt2img_random_seed")
    alice.page.wait_for_function("document.querySelector('#txt2img_seed input').value === '-1'")


def test_bad_width_is_a_readable_error_and_the_next_job_works(
    alice: StudioPage, studio_server: RunningStudio, artifacts: Path
) -> None:
    alice.small_job("txt2img", "a red cube")
    alice.set_number("txt2img_width", 100)
    alice.generate("txt2img")
    message = alice.wait_finished("txt2img")
    assert message.startswith("Error: width: must be a multiple of 8 (try 96 or 104)")
    alice.page.locator(".toast-body").first.wait_for()
    assert "width: must be a multiple of 8" in alice.toast_text()
    alice.screenshot(artifacts / "txt2img-error.png")
    assert "Traceback" not in alice.page.content()

    alice.set_number("txt2img_width", 64)
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    assert "Traceback" not in studio_server.log.read_text()


def test_interrupt_stops_a_long_job_and_skip_drops_one_batch(alice: StudioPage, artifacts: Path) -> None:
    alice.small_job("txt2img", "a very long job", steps=150)
    alice.set_number("txt2img_batch_count", 200)
    alice.record_progress("txt2img")
    alice.generate("txt2img")
    alice.wait_for_progress("txt2img", r"^Batch 1/200, Step \d+/150")
    alice.page.locator("#txt2img_preview img").wait_for(timeout=LONG)  # live preview while sampling
    alice.screenshot(artifacts / "txt2img-live-preview.png")
    alice.click("txt2img_interrupt")
    final = alice.wait_finished("txt2img")
    assert final.startswith("Interrupted")
    kept = int(re.search(r"\((\d+) images? kept\)", final).group(1))
    assert kept < 200
    steps_seen = [t for t in alice.progress_log("txt2img") if t.startswith("Batch ")]
    assert steps_seen and all(
        re.fullmatch(r"Batch \d+/200, Step \d+/150(, ETA \d+(s|m \d\ds))?", t) for t in steps_seen
    ), steps_seen

    # Skip abandons the batch being sampled; the job goes on with the next one
    alice.set_number("txt2img_batch_count", 2)
    alice.generate("txt2img")
    alice.wait_for_progress("txt2img", r"^Batch 1/2, Step \d+/150")
    alice.click("txt2img_skip")
    assert alice.wait_finished("txt2img") == "Done: 1 image"


def test_img2img_with_an_uploaded_image(alice: StudioPage, pictures: dict[str, Path]) -> None:
    alice.open_tab("img2img")
    alice.upload("img2img_image", pictures["source"])
    alice.small_job("img2img", "a watercolour of the gradient")
    alice.set_number("img2img_denoising_strength", 0.5)
    alice.generate("img2img")
    assert alice.wait_finished("img2img") == "Done: 1 image"
    infotext = alice.infotext("img2img")
    assert infotext.startswith("a watercolour of the gradient\n")
    assert "Denoising strength: 0.5" in infotext


def test_inpaint_with_an_uploaded_mask(alice: StudioPage, pictures: dict[str, Path]) -> None:
    alice.open_tab("img2img")
    alice.open_subtab("Inpaint upload")
    alice.upload("img2img_inpaint_base", pictures["source"])
    alice.upload("img2img_inpaint_mask", pictures["mask"])
    alice.small_job("img2img", "a hole in the middle")
    alice.generate("img2img")
    assert alice.wait_finished("img2img") == "Done: 1 image"
    infotext = alice.infotext("img2img")
    assert "Mask blur: 4" in infotext
    assert "Masked content: original" in infotext


def test_png_info_reads_parameters_and_sends_them_everywhere(
    alice: StudioPage, studio_server: RunningStudio, artifacts: Path
) -> None:
    from pipelines.outputs.saving import read_png_parameters

    alice.small_job("txt2img", "a harbour at noon")
    alice.set_number("txt2img_seed", 4321)
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    made = sorted(studio_server.outputs.rglob("*.png"))
    source = next(p for p in made if (read_png_parameters(p) or "").startswith("a harbour at noon"))
    expected = read_png_parameters(source)
    alice.set_text("txt2img_prompt", "something else")
    alice.set_number("txt2img_seed", -1)
    alice.set_number("txt2img_steps", 20)
    alice.open_tab("pnginfo")
    alice.upload("pnginfo_image", source)
    alice.page.wait_for_function(
        "document.querySelector('#pnginfo_parameters textarea').value.length > 0", timeout=LONG
    )
    assert alice.text_value("pnginfo_parameters") == expected
    assert "Seed" in alice.page.locator("#pnginfo_details").inner_text()
    alice.screenshot(artifacts / "pnginfo-read.png")

    alice.click("pnginfo_send_to_txt2img")
    alice.page.locator("#txt2img_prompt textarea").wait_for(state="visible")
    alice.page.wait_for_function(
        "document.querySelector('#txt2img_prompt textarea').value === 'a harbour at noon'"
    )
    assert alice.page.locator("#txt2img_seed input").input_value() == "4321"
    assert alice.page.locator("#txt2img_steps input[type=number]").input_value() == "2"
    assert alice.page.locator("#txt2img_width input[type=number]").input_value() == "64"

    alice.open_tab("pnginfo")
    alice.click("pnginfo_send_to_img2img")
    alice.page.locator("#img2img_image img").wait_for(state="visible")
    alice.page.wait_for_function(
        "document.querySelector('#img2img_prompt textarea').value === 'a harbour at noon'"
    )

    alice.open_tab("pnginfo")
    alice.click("pnginfo_send_to_inpaint")
    alice.page.locator("#img2img_inpaint_options").wait_for(state="visible")
    # paint a stroke across the middle of the image with the (white) brush, then inpaint it
    canvas = alice.page.locator("#img2img_inpaint canvas:visible").first
    canvas.wait_for()
    alice.page.wait_for_function(  # the editor shows "Upload an image" until it has the image
        "!document.querySelector('#img2img_inpaint').innerText.includes('Upload an image')"
    )
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    alice.page.mouse.move(x - 30, y)
    alice.page.mouse.down()
    for step in range(1, 16):
        alice.page.mouse.move(x - 30 + 4 * step, y)
    alice.page.mouse.up()
    alice.screenshot(artifacts / "img2img-inpaint-painted.png")
    alice.set_text("img2img_prompt", "a painted mask")
    alice.generate("img2img")
    assert alice.wait_finished("img2img") == "Done: 1 image", alice.progress("img2img")
    assert "Mask blur: 4" in alice.infotext("img2img")


def test_gallery_send_to_img2img_and_extras(alice: StudioPage) -> None:
    alice.small_job("txt2img", "a small boat")
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    alice.click("txt2img_send_to_img2img")
    alice.page.locator("#img2img_image img").wait_for(state="visible")
    alice.page.wait_for_function(
        "document.querySelector('#img2img_prompt textarea').value === 'a small boat'"
    )

    alice.open_tab("txt2img")
    alice.click("txt2img_send_to_extras")
    alice.page.locator("#extras_image img").wait_for(state="visible")
    alice.page.locator("#extras_upscaler_1 input").fill("Lanczos")
    alice.page.locator("#extras_upscaler_1 input").press("Enter")
    alice.generate("extras")
    assert alice.wait_finished("extras") == "Done: 1 image"
    assert "Postprocess upscale by: 2" in alice.infotext("extras")


def test_two_people_generate_at_once_and_each_sees_only_their_own_work(
    browser: Any, studio_server: RunningStudio, artifacts: Path
) -> None:
    alice = _open(browser, studio_server, "alice")
    bob = _open(browser, studio_server, "bob")
    try:
        alice.small_job("txt2img", "alice's secret garden", steps=40)  # long enough for bob to wait
        bob.small_job("txt2img", "bob's secret shed")
        bob.record_progress("txt2img")
        alice.generate("txt2img")
        alice.wait_for_progress("txt2img", "^(Loading|Step|Done)")
        bob.generate("txt2img")
        assert alice.wait_finished("txt2img") == "Done: 1 image"
        assert bob.wait_finished("txt2img") == "Done: 1 image"
        assert alice.infotext("txt2img").startswith("alice's secret garden\n")
        assert bob.infotext("txt2img").startswith("bob's secret shed\n")
        assert "Queued: position 1" in bob.progress_log("txt2img")

        alice.open_tab("queue")
        alice.page.wait_for_function(
            "document.querySelector('#queue_mine').innerText.includes(\"alice's secret garden\")"
        )
        alice.screenshot(artifacts / "queue-jobs.png")
        assert "bob's secret shed" not in alice.page.locator("body").inner_text()
    finally:
        alice.close()
        bob.close()


def test_a_saved_style_is_applied_to_the_job(alice: StudioPage) -> None:
    alice.page.locator("#txt2img_style_editor").click()
    name = alice.page.locator("#txt2img_style_name input")
    name.fill("film")
    name.press("Enter")
    alice.page.get_by_label("Style prompt ({prompt} marks where the prompt goes)").fill(
        "film still of {prompt}"
    )
    alice.click("txt2img_save_style")
    alice.page.get_by_text("Saved style 'film'").wait_for()
    styles = alice.page.locator("#txt2img_styles input")
    styles.fill("film")
    styles.press("Enter")
    alice.small_job("txt2img", "a tram")
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    assert alice.infotext("txt2img").startswith("film still of a tram\n")


def test_controlnet_unit_previews_its_preprocessor(alice: StudioPage, pictures: dict[str, Path]) -> None:
    alice.page.locator("#txt2img_controlnet").click()
    alice.upload("txt2img_cn0_image", pictures["source"])
    module = alice.page.locator("#txt2img_cn0_module input")
    module.fill("canny")
    module.press("Enter")
    alice.click("txt2img_cn0_run_preview")
    alice.page.locator("#txt2img_cn0_preview img").wait_for(timeout=LONG)


def test_login_is_required(browser: Any, studio_server: RunningStudio) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(studio_server.url)
        page.locator("input[type=password]").wait_for()
        assert page.locator("#txt2img_prompt").count() == 0
        page.locator("input[type=text]").first.fill("alice")
        page.locator("input[type=password]").fill("not the password")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect", exact=False).first.wait_for()
        assert page.locator("#txt2img_prompt").count() == 0
    finally:
        context.close()


def test_every_tab_renders(alice: StudioPage, artifacts: Path) -> None:
    """Screenshots of each tab (test-artifacts/ui/) and the element each one is for."""
    expected = {
        "txt2img": "#txt2img_generate",
        "img2img": "#img2img_generate",
        "extras": "#extras_generate",
        "pnginfo": "#pnginfo_image",
        "talking_head": "#tab_talking_head",
        "settings": "#settings_apply",
        "queue": "#queue_studio",
    }
    for tab, selector in expected.items():
        alice.open_tab(tab)
        alice.page.locator(selector).first.wait_for(state="visible")
        alice.screenshot(artifacts / f"{tab}.png")


def test_tiling_checkbox_reaches_the_job(alice: StudioPage) -> None:
    alice.small_job("txt2img", "a tiled floor")
    alice.page.get_by_text("Advanced", exact=True).first.click()
    alice.page.locator("#txt2img_tiling input[type=checkbox]").check()
    alice.generate("txt2img")
    assert alice.wait_finished("txt2img") == "Done: 1 image"
    assert "Tiling: True" in alice.infotext("txt2img")
