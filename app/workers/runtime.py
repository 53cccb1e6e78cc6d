"""Runs one contract job on one device and reports it as contract messages."""

from __future__ import annotations

import io
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.artifacts import Artifact, JobOutcome
from contract.events import PREVIEW_MAX_SIDE, PREVIEW_MIN_INTERVAL, JobProgress, WorkerState
from contract.jobs import parse_job_request
from contract.worker import ArtifactMessage, JobEventMessage, RunJob
from pipelines.errors import GenerationInterruptedError, StudioError
from pipelines.job_control import JobControl, ProgressEvent

if TYPE_CHECKING:
    from PIL import Image
    from pydantic import BaseModel

    from app.settings import StudioSettings
    from app.talking_head import TalkingHeadService
    from pipelines.generation.engine import ImageEngine
    from pipelines.generation.previews import LatentPreviewer

log = logging.getLogger(__name__)

Send = Callable[["BaseModel"], None]
FRAMES_PER_ARTIFACT = 25
"""Frames per message of a talking-head render part (one second of video): messages stay small."""


@dataclass
class ArtifactSink:
    """The engine's image sink inside a worker: each finished image is encoded exactly as the
    in-process saver would, and sent to the head, which writes it into ``outputs/``."""

    job_id: str
    send: Send
    refs: list[str] = field(default_factory=list)
    screen: Callable[[Image.Image], bool] | None = None
    """The safety checker, when the job asks for it: a flagged image leaves as a black one."""

    def save_image(
        self, image: Image.Image, *, folder: str, seed: int, infotext: str, kind: str = "images"
    ) -> str:
        from pipelines.outputs.saving import encode_image

        if self.screen is not None and self.screen(image):
            from PIL import Image as PILImage

            from app.safety_checker import mark_held_back

            image = PILImage.new("RGB", image.size, "black")
            infotext = mark_held_back(infotext)

        artifact = Artifact(
            kind="grid" if kind == "grids" else "image",
            folder=folder,
            extension="png",
            data=encode_image(image, "png", infotext),
            seed=seed,
            infotext=infotext,
        )
        self.send(ArtifactMessage(job_id=self.job_id, artifact=artifact))
        self.refs.append(artifact.ref)
        return artifact.ref


class _ProgressReporter:
    """Engine progress -> contract events, with previews rendered here and sent as small JPEGs at
    most every ``PREVIEW_MIN_INTERVAL`` seconds (and every ``preview_every`` steps)."""

    def __init__(self, runtime: WorkerRuntime, message: RunJob, send: Send, *, sdxl: bool) -> None:
        self.runtime = runtime
        self.message = message
        self.send = send
        self.sdxl = sdxl
        self.last_preview = 0.0
        self.last_preview_step = 0

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "saved":
            return  # the artifact itself tells the head
        preview = None
        if event.latents is not None and self.message.preview_mode != "none":
            now = time.monotonic()
            if event.step < self.last_preview_step:
                self.last_preview_step = 0  # the next batch started
            due = event.step - self.last_preview_step >= self.message.preview_every
            if due and now - self.last_preview >= PREVIEW_MIN_INTERVAL:
                preview = self.runtime.encode_preview(
                    event.latents, sdxl=self.sdxl, mode=self.message.preview_mode
                )
                self.last_preview, self.last_preview_step = now, event.step
        progress = JobProgress(
            stage=event.stage,
            step=event.step,
            steps=event.steps,
            batch_index=event.batch_index,
            batch_count=event.batch_count,
            message=event.message,
            preview=preview,
            worker=self.runtime.worker_id,
            device=self.runtime.device,
        )
        self.send(JobEventMessage(job_id=self.message.job_id, progress=progress))


def select_cuda_device(device: str) -> None:
    """Make ``device`` (``"cuda:N"``) this thread's current CUDA device.

    Everything that asks for plain ``"cuda"`` (the talking head, face restorers, upscalers, the
    annotators, VRAM and peak-memory reporting) then lands on this worker's GPU instead of GPU 0.
    The current device is per thread, so in-process workers call this on their own thread.
    """
    if not device.startswith("cuda:"):
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))


def _cuda_in_use() -> Any:
    """``torch.cuda`` when this worker computes on a GPU (torch already imported), else None."""
    torch: Any = sys.modules.get("torch")
    try:
        return torch.cuda if torch is not None and torch.cuda.is_initialized() else None
    except Exception:
        return None


def _vram_total() -> int | None:
    cuda = _cuda_in_use()
    try:
        return int(cuda.get_device_properties(cuda.current_device()).total_memory) if cuda else None
    except Exception:
        return None


class WorkerRuntime:
    """One device's engines. Runs one job at a time (the caller serialises jobs)."""

    def __init__(
        self,
        engine: ImageEngine,
        talking_head: TalkingHeadService | None,
        *,
        worker_id: str,
        device: str,
        previewer: LatentPreviewer | None = None,
        scratch_dir: Path | None = None,
        kind: str = "process",
    ) -> None:
        self.engine = engine
        self.talking_head = talking_head
        self.worker_id = worker_id
        self.device = device
        self.previewer = previewer
        self.scratch_dir = scratch_dir
        self.kind = kind
        self.busy_job: str | None = None
        self.vram_share = 1.0  # the part of the GPU's memory this worker may use (--gpu-share)
        self.jobs_done = 0
        self.last_error: str | None = None  # why the last model switch failed
        self.answered: str | None = None  # request_id of the last model switch
        self._lock = threading.Lock()

    @classmethod
    def create(cls, settings: StudioSettings, *, worker_id: str, device: str) -> WorkerRuntime:
        """A runtime with its own model cache for ``device`` (what a worker process builds)."""
        from app.services import build_engine, build_talking_head
        from pipelines.generation.previews import LatentPreviewer

        engine = build_engine(settings, device=device)
        scratch = settings.data_dir / "workers" / worker_id
        return cls(
            engine,
            build_talking_head(settings, engine, outputs_root=scratch),
            worker_id=worker_id,
            device=device,
            previewer=LatentPreviewer(engine.models.registry.paths.folder("vae_approx")),
            scratch_dir=scratch,
        )

    # state ---------------------------------------------------------------------------------------
    def state(self) -> WorkerState:
        models = self.engine.models
        current = models.current
        return WorkerState(
            worker=self.worker_id,
            device=self.device,
            busy_job=self.busy_job,
            loaded_checkpoints=[item.entry.title(item.short_hash) for item in models.loaded()],
            current_checkpoint=current.entry.title(current.short_hash) if current is not None else None,
            current_family=current.family.base if current is not None else None,
            jobs_done=self.jobs_done,
            kind=self.kind if self.kind in ("process", "ray") else "in-process",  # type: ignore[arg-type]
            last_error=self.last_error,
            answered=self.answered,
            vram_total_bytes=int(total * self.vram_share) if (total := _vram_total()) else None,
        )

    def set_default_model(
        self, checkpoint: str | None, *, load: bool, unload: bool = False, request_id: str = ""
    ) -> None:
        """Make ``checkpoint`` the default; a failed load is reported in the state, not raised."""
        models = self.engine.models
        self.last_error = None
        self.answered = request_id
        if unload:
            models.unload_all()
        if load:
            try:
                models.load(checkpoint)
            except Exception as exc:  # a damaged or refused file must not end the worker
                self.last_error = str(exc)
                return
        models.default_checkpoint = checkpoint

    def encode_preview(self, latents: Any, *, sdxl: bool, mode: str) -> bytes | None:
        if self.previewer is None:
            return None
        image = self.previewer.render(latents, sdxl=sdxl, mode=mode)
        if image is None:
            return None
        image.thumbnail((PREVIEW_MAX_SIDE * 4, PREVIEW_MAX_SIDE))  # a batch is a strip
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()

    # running ---------------------------------------------------------------------------------------
    def run(self, message: RunJob, send: Send, control: JobControl) -> JobOutcome:
        """Run the job; every failure becomes an outcome (only a dying process loses a job)."""
        with self._lock:
            self.busy_job = message.job_id
            try:
                return self._run(message, send, control)
            finally:
                self.busy_job = None
                self.jobs_done += 1

    def _run(self, message: RunJob, send: Send, control: JobControl) -> JobOutcome:
        inputs = None
        if message.warmup:  # only the time matters: the pictures stay here
            forward = send
            send = lambda sent: None if isinstance(sent, ArtifactMessage) else forward(sent)  # noqa: E731
        try:
            payload = message.request
            if message.files:
                inputs, payload = self._stage_files(message)
            if message.stage is not None:
                return self._talking_head_stage(payload, message, send, control)
            request = parse_job_request(payload)
            if getattr(request, "mode", None) == "talking_head":
                return self._talking_head(request, message, send, control)
            sink = ArtifactSink(message.job_id, send)
            if (getattr(request, "override_settings", None) or {}).get("sdstudio_safety_checker"):
                from app.safety_checker import worker_screen

                sink.screen = worker_screen(self.engine.models.registry.paths.models_root)
            reporter = _ProgressReporter(self, message, send, sdxl=self._sdxl())
            previous_sink = self.engine.config.image_sink
            self.engine.config.image_sink = sink
            cuda = _cuda_in_use()
            if cuda is not None:
                cuda.reset_peak_memory_stats()
            try:
                result = self.engine.run(request, control=control, on_progress=reporter)
            finally:
                self.engine.config.image_sink = previous_sink
            return JobOutcome(
                state="done",
                info=result.info(),
                artifacts=[image.ref for image in result.images],
                interrupted=result.interrupted,
                peak_vram_bytes=int(cuda.max_memory_allocated()) if cuda is not None else None,
            )
        except GenerationInterruptedError as exc:
            return JobOutcome(state="cancelled", error=str(exc))
        except (StudioError, ValueError) as exc:  # input problems and request validation
            return JobOutcome(state="failed", error=str(exc))
        except Exception as exc:
            log.exception("job %s failed", message.job_id)
            return JobOutcome(state="failed", error=f"internal error: {exc.__class__.__name__}: {exc}")
        finally:
            if inputs is not None:
                shutil.rmtree(inputs, ignore_errors=True)

    def _stage_files(self, message: RunJob) -> tuple[Path, dict[str, Any]]:
        """Save the files sent with the job and point the request at them (a worker on another PC
        cannot read the head's paths)."""
        import tempfile

        from app.jobs.artifacts import plain_name

        base = self.scratch_dir / "inputs" if self.scratch_dir is not None else None
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=base))
        payload = dict(message.request)
        for index, item in enumerate(message.files):
            path = folder / f"{index}-{plain_name(item.name)}"
            path.write_bytes(item.data)
            payload[item.request_field] = str(path)
        return folder, payload

    def _sdxl(self) -> bool:
        current = self.engine.models.current
        return bool(current is not None and current.family.is_sdxl)

    def _talking_head_reporter(self, message: RunJob, send: Send) -> Callable[[ProgressEvent], None]:
        def report(event: ProgressEvent) -> None:
            if event.stage == "saved":
                return
            send(
                JobEventMessage(
                    job_id=message.job_id,
                    progress=JobProgress(
                        stage=event.stage,
                        step=event.step,
                        steps=event.steps,
                        batch_index=event.batch_index,
                        batch_count=event.batch_count,
                        message=event.message,
                        worker=self.worker_id,
                        device=self.device,
                    ),
                )
            )

        return report

    def _talking_head_stage(
        self, payload: dict[str, Any], message: RunJob, send: Send, control: JobControl
    ) -> JobOutcome:
        """One part of a talking head split over workers (``app/jobs/talking_head_split.py``)."""
        from contract.talking_head import TalkingHeadRequest
        from sadtalker.motion_plan import MotionPlan, pack_frames

        if self.talking_head is None:
            raise ValueError("mode: talking-head jobs are not enabled in this studio")
        report = self._talking_head_reporter(message, send)
        stage = message.stage
        if stage is None or stage.kind == "motion":
            request = TalkingHeadRequest.model_validate(payload)
            plan = self.talking_head.plan(request, control=control, on_progress=report)
            motion = Artifact(kind="motion", folder="talking-head", extension="npz", data=plan.to_bytes())
            send(ArtifactMessage(job_id=message.job_id, artifact=motion))
            info = {"frames": plan.frame_count, "seed": plan.seed, "duration": plan.duration}
            return JobOutcome(state="done", info=info, artifacts=[motion.ref])
        try:
            plan = MotionPlan.from_bytes(stage.plan)
        except ValueError as exc:
            return JobOutcome(state="failed", error=str(exc))
        refs: list[str] = []
        block: list[Any] = []
        first = [stage.start]

        def flush() -> None:
            if not block:
                return
            import numpy as np

            frames = Artifact(
                kind="frames",
                folder="talking-head",
                extension="npz",
                data=pack_frames(np.stack(block), first[0]),
                first_frame=first[0],
            )
            send(ArtifactMessage(job_id=message.job_id, artifact=frames))
            refs.append(frames.ref)
            first[0] += len(block)
            block.clear()

        def sink(frame: Any, index: int) -> None:
            block.append(frame)
            if len(block) >= FRAMES_PER_ARTIFACT:
                flush()

        seconds = self.talking_head.render_frames(
            plan, stage.start, stage.end, sink, control=control, on_progress=report
        )
        flush()
        info = {
            "frames": [stage.start, stage.end],
            "stage_seconds": seconds,
            "device": self.device,
            "worker": self.worker_id,
        }
        return JobOutcome(state="done", info=info, artifacts=refs)

    def _talking_head(self, request: Any, message: RunJob, send: Send, control: JobControl) -> JobOutcome:
        if self.talking_head is None:
            raise ValueError("mode: talking-head jobs are not enabled in this studio")
        report = self._talking_head_reporter(message, send)
        result = self.talking_head.run(request, control=control, on_progress=report)
        video_path, sidecar_path = Path(result.result.path), Path(result.result.sidecar)
        try:
            video = Artifact(
                kind="video",
                folder="talking-head",
                extension=video_path.suffix.lstrip(".") or "mp4",
                data=video_path.read_bytes(),
                seed=result.result.seed,
                stem=video_path.stem,
            )
            sidecar = Artifact(
                kind="sidecar",
                folder="talking-head",
                extension="json",
                data=sidecar_path.read_bytes(),
                stem=sidecar_path.stem,
                pairs_with=video.sha256,
            )
        finally:  # the head writes the only copy (under the same name: remove ours first)
            video_path.unlink(missing_ok=True)
            sidecar_path.unlink(missing_ok=True)
        send(ArtifactMessage(job_id=message.job_id, artifact=video))
        send(ArtifactMessage(job_id=message.job_id, artifact=sidecar))
        info = result.info()
        info.update(video=video.ref, sidecar=sidecar.ref)
        return JobOutcome(state="done", info=info, artifacts=[video.ref])

    def close(self) -> None:
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
