"""Saved styles (A1111's styles.csv) and their application to every job by the executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.jobs.executor import LocalExecutor
from app.styles import PromptStyle, StyleStore, UnknownStyleError, apply_request_styles, merge_style_text
from contract.images import ExtrasRequest, Txt2ImgRequest

A1111_STYLES_CSV = (
    "name,prompt,negative_prompt\n"
    'cinematic,"cinematic still of {prompt}, film grain","cartoon, drawing"\n'
    "sharp,highly detailed,blurry\n"
    ",ignored row without a name,\n"
)


@pytest.fixture
def store(tmp_path: Path) -> StyleStore:
    path = tmp_path / "styles.csv"
    path.write_text(A1111_STYLES_CSV, encoding="utf-8")
    return StyleStore(path)


def test_reads_an_a1111_styles_file(store: StyleStore) -> None:
    assert store.names() == ["cinematic", "sharp"]
    assert store.get("cinematic") == PromptStyle(
        "cinematic", "cinematic still of {prompt}, film grain", "cartoon, drawing"
    )


def test_placeholder_or_appended_like_a1111() -> None:
    assert merge_style_text("photo of {prompt}, 35mm", "a cat") == "photo of a cat, 35mm"
    assert merge_style_text("highly detailed", "a cat") == "a cat, highly detailed"
    assert merge_style_text("highly detailed", "") == "highly detailed"
    assert merge_style_text("", "a cat") == "a cat"


def test_styles_apply_in_order(store: StyleStore) -> None:
    prompt, negative = store.apply("a cat", "ugly", ["cinematic", "sharp"])
    assert prompt == "cinematic still of a cat, film grain, highly detailed"
    assert negative == "ugly, cartoon, drawing, blurry"


def test_unknown_style_names_the_file_and_the_choices(store: StyleStore) -> None:
    with pytest.raises(
        UnknownStyleError, match=r"Style 'noir' is not in .*styles.csv \(saved styles: cinematic, sharp\)"
    ):
        store.apply("a cat", "", ["noir"])


def test_save_replace_and_delete_round_trip(tmp_path: Path) -> None:
    store = StyleStore(tmp_path / "new" / "styles.csv")
    assert store.names() == []
    store.save_style(PromptStyle("quoted", 'say "hi", {prompt}', "line one\nline two"))
    store.save_style(PromptStyle("plain", "oil painting", ""))
    store.save_style(PromptStyle("quoted", "replaced {prompt}", ""))
    assert store.names() == ["quoted", "plain"]  # a replaced style keeps its place
    assert store.get("quoted").prompt == "replaced {prompt}"
    assert StyleStore(store.path).load() == store.load()  # what was written reads back the same
    assert store.delete("quoted") is True
    assert store.delete("quoted") is False
    assert store.names() == ["plain"]


class _RecordingEngine:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def run(self, request: Any, **_: Any) -> str:
        self.requests.append(request)
        return "result"


def test_executor_writes_styles_into_the_prompts(store: StyleStore) -> None:
    engine = _RecordingEngine()
    executor = LocalExecutor(engine, styles=store)  # type: ignore[arg-type]
    request = Txt2ImgRequest(prompt="a cat", negative_prompt="ugly", styles=["sharp"])
    assert executor.execute(request) == "result"
    sent = engine.requests[0]
    assert (sent.prompt, sent.negative_prompt, sent.styles) == ("a cat, highly detailed", "ugly, blurry", [])
    assert request.prompt == "a cat"  # the caller's request is not modified
    assert apply_request_styles(sent, store) is sent  # applying again changes nothing


def test_requests_without_styles_pass_through(store: StyleStore, tmp_path: Path) -> None:
    from PIL import Image

    engine = _RecordingEngine()
    executor = LocalExecutor(engine, styles=store)  # type: ignore[arg-type]
    plain = Txt2ImgRequest(prompt="a cat")
    picture = tmp_path / "x.png"  # image inputs are checked when a request is made (issue 12)
    Image.new("RGB", (8, 8)).save(picture)
    extras = ExtrasRequest(image=str(picture))
    executor.execute(plain)
    executor.execute(extras)
    assert engine.requests == [plain, extras]
