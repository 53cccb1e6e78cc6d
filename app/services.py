"""Builds the studio's long-lived objects from settings and hands them to UI, API and CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from app.face_detection import RetinaFaceProvider
from app.jobs.executor import LocalExecutor
from app.settings import StudioSettings
from app.styles import StyleStore
from app.talking_head import TalkingHeadService
from app.uploads import StagedUploads
from pipelines.generation.engine import EngineConfig, ImageEngine
from pipelines.models.hashing import HashCache
from pipelines.models.model_manager import ModelManager
from pipelines.models.registry import ModelPaths, ModelRegistry

if TYPE_CHECKING:
    from app.jobs.queue import JobQueue


@dataclass
class StudioServices:
    settings: StudioSettings
    registry: ModelRegistry
    models: ModelManager
    engine: ImageEngine
    executor: LocalExecutor
    styles: StyleStore
    uploads: StagedUploads
    _queue_started: bool = field(default=False, init=False)

    @cached_property
    def queue(self) -> JobQueue:
        """The durable job queue (opened on first use: the headless CLI never needs it)."""
        from app.jobs.queue import JobQueue
        from app.jobs.store import JobStore

        store = JobStore(self.settings.data_dir / "jobs.sqlite3")
        return JobQueue(store, self.executor, max_queued=self.settings.max_queued_jobs)

    def start_queue(self) -> JobQueue:
        if not self._queue_started:
            self.queue.start()
            self._queue_started = True
        return self.queue

    @classmethod
    def create(cls, settings: StudioSettings, *, outputs_dir: Path | None = None) -> StudioServices:
        paths = ModelPaths(
            models_root=settings.models_dir,
            checkpoints=settings.ckpt_dir,
            vae=settings.vae_dir,
            lora=settings.lora_dir,
            controlnet=settings.controlnet_dir,
            upscalers=settings.esrgan_dir,
            embeddings=settings.embeddings_dir,
        )
        registry = ModelRegistry(paths, HashCache(settings.data_dir / "cache" / "hashes.json"))
        models = ModelManager(
            registry, max_loaded=settings.checkpoints_in_ram, default_checkpoint=settings.default_checkpoint
        )
        engine = ImageEngine(
            models,
            EngineConfig(
                outputs_root=outputs_dir or settings.outputs_dir,
                memory_preset=settings.memory_preset,
                memory_overrides=settings.memory_overrides(),
                models_root=settings.models_dir,
                lora_dir=paths.folder("lora"),
                embeddings_dir=paths.folder("embedding"),
                vae_dir=paths.folder("vae"),
                face_detector=RetinaFaceProvider(settings.models_dir),
            ),
        )
        styles = StyleStore(settings.data_dir / "styles.csv")
        uploads = StagedUploads(settings.data_dir / "uploads")  # files API clients send with a job
        talking_head = TalkingHeadService(
            settings.models_dir, outputs_dir or settings.outputs_dir, image_engine=engine, uploads=uploads
        )
        return cls(
            settings=settings,
            registry=registry,
            models=models,
            engine=engine,
            executor=LocalExecutor(engine, styles=styles, talking_head=talking_head),
            styles=styles,
            uploads=uploads,
        )
