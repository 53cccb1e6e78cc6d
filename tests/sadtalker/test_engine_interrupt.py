"""``TalkingHeadEngine.run(should_stop=...)``: a stop request ends the run between batches (or stages)
with ``TalkingHeadInterruptedError`` and leaves nothing in ``outputs/talking-head`` (no MP4, no
sidecar, no hidden temporary file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.talking_head import TalkingHeadRequest
from pipelines.errors import GenerationInterruptedError
from sadtalker.engine import TalkingHeadEngine
from sadtalker.errors import TalkingHeadInterruptedError
from tests.sadtalker.helpers import files_in


def test_stop_after_the_first_batch_keeps_no_file(
    engine: TalkingHeadEngine, astronaut_png: Path, speech_wav: Path
) -> None:
    events: list[tuple[str, int, int]] = []

    def first_batch_encoded() -> bool:
        return any(stage == "encode" and done >= 4 for stage, done, _ in events)

    request = TalkingHeadRequest(image=astronaut_png, audio=speech_wav, seed=5, batch_size=4)
    with pytest.raises(
        TalkingHeadInterruptedError, match=r"during render \(4 of \d+ frames done\)"
    ) as caught:
        engine.run(
            request,
            on_progress=lambda stage, done, total: events.append((stage, done, total)),
            should_stop=first_batch_encoded,
        )
    assert isinstance(caught.value, GenerationInterruptedError)  # queues treat it as an interrupt
    assert "no video was saved" in str(caught.value)
    rendered = [done for stage, done, _ in events if stage == "render" and done]
    assert rendered == [4], events  # the second batch was never rendered
    assert files_in(engine.outputs_root / "talking-head") == []  # the 4-frame temp MP4 is gone too


def test_stop_before_the_models_load(
    engine: TalkingHeadEngine, astronaut_png: Path, speech_wav: Path
) -> None:
    stages: list[str] = []
    request = TalkingHeadRequest(image=astronaut_png, audio=speech_wav)
    with pytest.raises(TalkingHeadInterruptedError, match="before loading the models"):
        engine.run(request, on_progress=lambda stage, *_: stages.append(stage), should_stop=lambda: True)
    assert set(stages) <= {"preprocess"}
    assert files_in(engine.outputs_root / "talking-head") == []


def test_a_hook_that_never_fires_changes_nothing(
    engine: TalkingHeadEngine, astronaut_png: Path, speech_wav: Path
) -> None:
    asked: list[bool] = []

    def never() -> bool:
        asked.append(True)
        return False

    request = TalkingHeadRequest(image=astronaut_png, audio=speech_wav, seed=5, batch_size=8)
    result = engine.run(request, should_stop=never)
    assert len(asked) > result.frames  # polled before every frame and between stages
    assert files_in(result.path.parent) == sorted([result.path.name, result.sidecar.name])
