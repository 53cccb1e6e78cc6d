"""A thin page object over Playwright for the studio's tabs (selectors live here, not in tests)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LONG = 180_000  # ms: generous waits, the test machine is small and shared
FINISHED = re.compile(r"^(Done|Interrupted|Error)")
TAB_LABELS = {
    "txt2img": "txt2img",
    "img2img": "img2img",
    "extras": "Extras",
    "pnginfo": "PNG Info",
    "talking_head": "Talking head",
    "settings": "Settings",
    "queue": "Queue / Cluster",
}

# Records every text the progress line of a tab shows, so a test can tell that "Loading model"
# or "Step 3/150" appeared even when it lasted a fraction of a second.
_RECORD_PROGRESS = """
(prefix) => {
  window.__progress = window.__progress || {};
  const log = (window.__progress[prefix] = []);
  const node = document.getElementById(prefix + "_progress");
  const push = () => {
    const text = (node.querySelector(".sd-progress-text")?.innerText || "").trim();
    if (text && log[log.length - 1] !== text) log.push(text);
  };
  new MutationObserver(push).observe(node, {subtree: true, childList: true, characterData: true});
}
"""


class StudioPage:
    def __init__(self, page: Any) -> None:
        self.page = page

    # session -------------------------------------------------------------------------------
    @classmethod
    def open(cls, browser: Any, url: str, user: str, password: str) -> StudioPage:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        studio = cls(page)
        studio.login(url, user, password)
        return studio

    def login(self, url: str, user: str, password: str) -> None:
        page = self.page
        page.goto(url)
        page.locator("input[type=text]").first.fill(user)
        page.locator("input[type=password]").fill(password)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#txt2img_prompt textarea", timeout=LONG)

    def close(self) -> None:
        self.page.context.close()

    # navigation and inputs -----------------------------------------------------------------
    def open_tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=TAB_LABELS[name], exact=True).click()

    def open_subtab(self, label: str) -> None:
        self.page.get_by_role("tab", name=label, exact=True).click()

    def set_number(self, elem_id: str, value: float | int) -> None:
        """Type into a slider's or number's input box (as a user does) and commit it."""
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def set_text(self, elem_id: str, text: str) -> None:
        self.page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first.fill(text)

    def text_value(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()

    def upload(self, elem_id: str, path: Path) -> None:
        self.page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
        self.page.locator(f"#{elem_id} img").first.wait_for(timeout=LONG)

    # generating ----------------------------------------------------------------------------
    def small_job(self, prefix: str, prompt: str, *, steps: int = 2, size: int = 64) -> None:
        self.set_text(f"{prefix}_prompt", prompt)
        self.set_number(f"{prefix}_width", size)
        self.set_number(f"{prefix}_height", size)
        self.set_number(f"{prefix}_steps", steps)

    def generate(self, prefix: str) -> None:
        """Click Generate, first blanking the previous run's progress line so that waits below
        cannot see the old result."""
        self.page.evaluate(
            "(p) => document.querySelectorAll('#' + p + '_progress .sd-progress-text')"
            ".forEach((node) => { node.innerText = ''; })",
            prefix,
        )
        self.click(f"{prefix}_generate")

    def record_progress(self, prefix: str) -> None:
        self.page.evaluate(_RECORD_PROGRESS, prefix)

    def progress_log(self, prefix: str) -> list[str]:
        return list(self.page.evaluate("(p) => (window.__progress || {})[p] || []", prefix))

    def click(self, elem_id: str) -> None:
        self.page.locator(f"#{elem_id}").click()

    def progress(self, prefix: str) -> str:
        return self.page.locator(f"#{prefix}_progress .sd-progress-text").inner_text().strip()

    def wait_for_progress(self, prefix: str, pattern: str, timeout: int = LONG) -> str:
        """Wait until the progress line matches ``pattern`` (a JS regular expression)."""
        self.page.wait_for_function(
            "([p, rx]) => new RegExp(rx).test("
            "(document.querySelector('#' + p + '_progress .sd-progress-text')?.innerText || '').trim())",
            arg=[prefix, pattern],
            timeout=timeout,
        )
        return self.progress(prefix)

    def wait_finished(self, prefix: str) -> str:
        return self.wait_for_progress(prefix, FINISHED.pattern)

    def gallery_count(self, prefix: str) -> int:
        return self.page.locator(
            f"#{prefix}_gallery .thumbnail-item, #{prefix}_gallery .thumbnails img"
        ).count()

    def gallery_images(self, prefix: str) -> int:
        return self.page.locator(f"#{prefix}_gallery img").count()

    def infotext(self, prefix: str) -> str:
        return self.page.locator(f"#{prefix}_infotext textarea").input_value()

    def toast_text(self) -> str:
        toasts = self.page.locator(".toast-body")
        return "\n".join(toasts.all_inner_texts())

    def screenshot(self, path: Path) -> None:
        self.page.screenshot(path=str(path), full_page=True)
