"""The talking-head engine as a studio service: built on first use, with the shared face
restorers as its enhancers, and its results shaped like image jobs for the queue.

A job's ``JobControl`` reaches the engine as its ``should_stop`` hook: Interrupt (or Skip: a talking
head is a single "batch") stops it between frames, and the engine's ``TalkingHeadInterruptedError`` is a
``GenerationInterruptedError``, so the queue records the job as cancelled, as an image job
interrupted before its first image. Inputs the API staged for the job are removed once it has run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.job_control import JobControl, ProgressCallback, ProgressEvent

if TYPE_CHECKING:
    import numpy as np

    from app.uploads import StagedUploads
    from contract.talking_head import TalkingHeadRequest
    from sadtalker.engine import TalkingHeadEngine, TalkingHeadResult
    from sadtalker.motion_plan import MotionPlan

ENHANCER_MODELS = {"gfpgan": "GFPGAN", "RestoreFormer": "RestoreFormer"}


@dataclass(frozen=True)
class VideoOutput:
    path: Path
    seed: int
    subseed: int = 0
    infotext: str = ""


@dataclass
class TalkingHeadJobResult:
    """Quacks like ``GenerationResult`` for the queue and the API: ``images`` holds the video."""

    result: TalkingHeadResult
    request: TalkingHeadRequest
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def images(self) -> list[VideoOutput]:
        return [VideoOutput(path=self.result.path, seed=self.result.seed)]

    def info(self) -> dict[str, Any]:
        return {
            "video": str(self.result.path),
            "sidecar": str(self.result.sidecar),
            "duration": self.result.duration,
            "frames": self.result.frames,
            "seed": self.result.seed,
            "stage_seconds": self.result.stage_seconds,
            "parameters": self.request.model_dump(mode="json"),
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        }


class TalkingHeadService:
    def __init__(
        self,
        models_root: Path,
        outputs_root: Path,
        image_engine: Any = None,
        uploads: StagedUploads | None = None,
    ) -> None:
        self.models_root = models_root
        self.outputs_root = outputs_root
        self.image_engine = image_engine  # shares its face-restore model cache
        self.uploads = uploads  # where the API stages its clients' files; emptied after each job
        self._engine: TalkingHeadEngine | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> TalkingHeadEngine:
        with self._lock:
            if self._engine is None:
                from sadtalker.engine import TalkingHeadEngine

                self._engine = TalkingHeadEngine(
                    self.models_root,
                    self.outputs_root,
                    enhancer_loader=self._enhancer,
                    background_loader=self._background_enhancer,
                )
            return self._engine

    def _background_enhancer(self, name: str) -> Any:
        """A frame upscaler from the studio's upscalers (models/ESRGAN), sharing the image modes'
        model cache."""
        from sadtalker.background import load_background_enhancer

        return load_background_enhancer(
            self.models_root,
            name,
            cache=self.image_engine.upscaler_cache if self.image_engine else None,
            device=self.engine.device,
        )

    def _enhancer(self, name: str) -> Any:
        """A frame enhancer from the face-restore component the image modes use."""
        import numpy as np
        from PIL import Image

        from pipelines.postprocess.face_restore import restore_faces

        model = ENHANCER_MODELS[name]
        provider = self.image_engine.config.face_detector if self.image_engine else None
        detector = provider() if provider else None  # RetinaFace when its weights are installed

        def enhance(frame: np.ndarray) -> np.ndarray:
            restored = restore_faces(
                Image.fromarray(frame),
                model=model,
                cache=self.image_engine.upscaler_cache if self.image_engine else None,
                models_root=self.models_root,
                detector=detector,
            )
            return np.asarray(restored.image.convert("RGB"))

        return enhance

    def run(
        self,
        request: TalkingHeadRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TalkingHeadJobResult:
        should_stop = control.should_stop_batch if control is not None else None
        try:
            result = self.engine.run(
                request, on_progress=_stage_reporter(on_progress), should_stop=should_stop
            )
        finally:
            # A crash never gets here: the requeued job then finds its inputs again.
            if self.uploads is not None:
                self.uploads.release(request)
        if on_progress:
            on_progress(ProgressEvent(stage="saved", message=str(result.path)))
            on_progress(ProgressEvent(stage="done"))
        return TalkingHeadJobResult(result=result, request=request)

    def plan(
        self,
        request: TalkingHeadRequest,
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> MotionPlan:
        """The motion stage of a talking head split over workers (its inputs stay: the head muxes the
        speech once every part is done, and releases them then)."""
        should_stop = control.should_stop_batch if control is not None else None
        return self.engine.plan(request, on_progress=_stage_reporter(on_progress), should_stop=should_stop)

    def render_frames(
        self,
        plan: MotionPlan,
        start: int,
        end: int,
        sink: Callable[[np.ndarray, int], None],
        *,
        control: JobControl | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, float]:
        """Finished frames ``[start, end)`` of a split talking head, handed to ``sink`` in order."""
        should_stop = control.should_stop_batch if control is not None else None
        return self.engine.render_frames(
            plan, start, end, sink, on_progress=_stage_reporter(on_progress), should_stop=should_stop
        )


STAGES = ("preprocess", "audio2coeff", "render", "enhance", "encode")


def _stage_reporter(on_progress: ProgressCallback | None) -> Callable[[str, int, int], None]:
    """The engine's ``(stage, done, total)`` reports as queue progress events."""

    def report(stage: str, done: int, total: int) -> None:
        if on_progress is None:
            return
        index = STAGES.index(stage) if stage in STAGES else 0
        # One "batch" per stage so the overall fraction moves through the stages in order.
        on_progress(
            ProgressEvent(
                stage="sampling",
                step=done,
                steps=max(1, total),
                batch_index=index,
                batch_count=len(STAGES),
                message=stage,
            )
        )

    return report
