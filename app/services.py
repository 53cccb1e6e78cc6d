"""Builds the studio's long-lived objects from settings and hands them to UI, API and CLI.

The head (this process) owns the registry of model files, styles, staged uploads, the durable
queue and the worker pool. Engines live in workers: in worker processes for the studio, or in this
process for the headless CLI and for ``--in-process-workers``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from app.face_detection import RetinaFaceProvider
from app.settings import StudioSettings
from app.styles import StyleStore
from app.talking_head import TalkingHeadService
from app.uploads import StagedUploads
from pipelines.generation.engine import EngineConfig, ImageEngine
from pipelines.models.hashing import HashCache
from pipelines.models.model_manager import ModelManager
from pipelines.models.registry import ModelPaths, ModelRegistry

if TYPE_CHECKING:
    from app.jobs.executor import LocalExecutor
    from app.jobs.queue import JobQueue
    from app.workers.pool import WorkerPool


def model_paths(settings: StudioSettings) -> ModelPaths:
    return ModelPaths(
        models_root=settings.models_dir,
        checkpoints=settings.ckpt_dir,
        vae=settings.vae_dir,
        lora=settings.lora_dir,
        controlnet=settings.controlnet_dir,
        upscalers=settings.esrgan_dir,
        embeddings=settings.embeddings_dir,
    )


def build_registry(settings: StudioSettings) -> ModelRegistry:
    return ModelRegistry(model_paths(settings), HashCache(settings.data_dir / "cache" / "hashes.json"))


class _EmptyFp32Notice(logging.Filter):
    """Drops diffusers' "modules ... should be kept in float32: []": with an empty list there is
    nothing to keep, yet it is printed at every model load (issue 12: no warnings at every start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def quiet_empty_fp32_notice() -> None:
    target = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(existing, _EmptyFp32Notice) for existing in target.filters):
        target.addFilter(_EmptyFp32Notice())


def build_engine(
    settings: StudioSettings,
    *,
    device: str | None = None,
    outputs_root: Path | None = None,
    registry: ModelRegistry | None = None,
) -> ImageEngine:
    """An engine with its own model cache; ``device`` pins it to one device (a worker's)."""
    quiet_empty_fp32_notice()
    registry = registry or build_registry(settings)
    paths = registry.paths
    models = ModelManager(
        registry, max_loaded=settings.checkpoints_in_ram, default_checkpoint=settings.default_checkpoint
    )
    overrides = settings.memory_overrides()
    if device is not None:
        overrides["device"] = device
    return ImageEngine(
        models,
        EngineConfig(
            outputs_root=outputs_root or settings.outputs_dir,
            memory_preset=settings.memory_preset,
            memory_overrides=overrides,
            speed_defaults=settings.speed_defaults(),
            models_root=settings.models_dir,
            lora_dir=paths.folder("lora"),
            embeddings_dir=paths.folder("embedding"),
            vae_dir=paths.folder("vae"),
            face_detector=RetinaFaceProvider(settings.models_dir),
        ),
    )


def build_talking_head(
    settings: StudioSettings, engine: ImageEngine, *, outputs_root: Path | None = None
) -> TalkingHeadService:
    return TalkingHeadService(
        settings.models_dir,
        outputs_root or settings.outputs_dir,
        image_engine=engine,
        uploads=StagedUploads(settings.data_dir / "uploads"),
    )


@dataclass
class StudioServices:
    settings: StudioSettings
    registry: ModelRegistry
    styles: StyleStore
    uploads: StagedUploads
    outputs_root: Path
    selected_checkpoint: str | None = None
    """The model jobs that name none run on (``--ckpt``, the UI's dropdown, POST /options)."""
    _queue_started: bool = field(default=False, init=False)

    # in-process engine (CLI, in-process workers, head-side previews of ControlNet preprocessors) -----
    @cached_property
    def engine(self) -> ImageEngine:
        return build_engine(self.settings, outputs_root=self.outputs_root, registry=self.registry)

    @property
    def models(self) -> ModelManager:
        return self.engine.models

    @cached_property
    def talking_head(self) -> TalkingHeadService:
        return build_talking_head(self.settings, self.engine, outputs_root=self.outputs_root)

    @cached_property
    def executor(self) -> LocalExecutor:
        """Runs a job in this process, synchronously (the headless CLI)."""
        from app.jobs.executor import LocalExecutor

        return LocalExecutor(self.engine, styles=self.styles, talking_head=self.talking_head)

    # the studio's job path ----------------------------------------------------------------------------
    @cached_property
    def workers(self) -> WorkerPool:
        """One worker per device: processes by default, threads with ``--in-process-workers``."""
        from app.workers.pool import WorkerPool

        return WorkerPool.from_settings(self)

    @cached_property
    def queue(self) -> JobQueue:
        """The durable job queue (opened on first use: the headless CLI never needs it)."""
        from app.jobs.queue import JobQueue
        from app.jobs.store import JobStore

        store = JobStore(self.settings.data_dir / "jobs.sqlite3")
        return JobQueue(
            store,
            self.workers,
            outputs_root=self.outputs_root,
            styles=self.styles,
            max_queued=self.settings.max_queued_jobs,
            max_attempts=self.settings.max_job_attempts,
            preview_mode=lambda: (self.settings.live_preview, self.settings.live_preview_every),
            checkpoint_title=self.checkpoint_title,
            split_seconds=self.settings.talking_head_split_seconds,
            parts_root=self.settings.data_dir / "talking-head-parts",
            release_inputs=self.uploads.release,
            warmup=bool(self.settings.cluster_address),  # placement between PCs needs a first measurement
        )

    def start_queue(self) -> JobQueue:
        if not self._queue_started:
            self.queue.start()
            self._queue_started = True
        return self.queue

    def checkpoint_title(self, name: str) -> str | None:
        """A1111's title (``file.safetensors [hash]``) for a name a job gives, None if unknown."""
        from pipelines.errors import ModelNotFoundError

        try:
            return self.registry.title(self.registry.find("checkpoint", name))
        except (ModelNotFoundError, ValueError):
            return None

    def current_checkpoint(self) -> str | None:
        """The model the workers have loaded (the first worker that has one), as a title."""
        return self.workers.current_checkpoint()

    @classmethod
    def create(cls, settings: StudioSettings, *, outputs_dir: Path | None = None) -> StudioServices:
        return cls(
            settings=settings,
            registry=build_registry(settings),
            styles=StyleStore(settings.data_dir / "styles.csv"),
            uploads=StagedUploads(settings.data_dir / "uploads"),  # files API clients send with a job
            outputs_root=outputs_dir or settings.outputs_dir,
            selected_checkpoint=settings.default_checkpoint,
        )
