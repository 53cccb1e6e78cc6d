"""What every router needs: the studio's services, the auth policy, and the job plumbing.

A1111's endpoints block until their job is done, but they still go through the durable queue
(fair between users, recorded before it is acknowledged, resumed after a crash); waiting polls the
job store from the event loop, so a hundred blocked clients hold no worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from app.api.security import ApiAuth, Caller

if TYPE_CHECKING:
    from app.jobs.queue import JobQueue, JobStatus
    from app.services import StudioServices

FILES_PREFIX = "/studio/v1/files"
JOBS_PREFIX = "/studio/v1/jobs"
WAIT_POLL_SECONDS = 0.1


@dataclass
class ApiContext:
    services: StudioServices
    auth: ApiAuth = field(default_factory=ApiAuth)
    # Options A1111 clients set through POST /sdapi/v1/options and expect to apply to later jobs.
    option_overrides: dict[str, Any] = field(default_factory=dict)
    _model_switch_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def queue(self) -> JobQueue:
        return self.services.queue

    @property
    def outputs_dir(self) -> Path:
        return Path(self.services.engine.config.outputs_root)

    # jobs -----------------------------------------------------------------------------------
    async def submit(self, request: Any, caller: Caller) -> str:
        """Record the job durably, then return its id (QueueFullError becomes 429)."""
        return await run_in_threadpool(self.queue.submit, request, owner=caller.owner)

    async def wait(self, job_id: str) -> JobStatus:
        """Wait for a job to finish without holding a thread."""
        store = self.queue.store
        while True:
            record = await run_in_threadpool(store.get, job_id)
            if record is None:
                raise HTTPException(status_code=404, detail=f"job {job_id} not found")
            if record.state in ("done", "failed", "cancelled"):
                status = await run_in_threadpool(self.queue.status, job_id)
                assert status is not None
                return status
            await asyncio.sleep(WAIT_POLL_SECONDS)

    def may_see(self, status: JobStatus, caller: Caller) -> bool:
        """With auth on, users see and control only their own jobs; without it, everyone is one user."""
        return not caller.authenticated or status.owner == caller.owner

    def running_jobs(self, caller: Caller) -> list[JobStatus]:
        """Running jobs this caller may see and control (A1111's /progress, /interrupt, /skip)."""
        statuses = [self.queue.status(job_id) for job_id in self.queue.running_ids()]
        return [s for s in statuses if s is not None and s.state == "running" and self.may_see(s, caller)]

    def queued_count(self, caller: Caller) -> int:
        if not caller.authenticated:
            return len(self.queue.store.queued_ids())
        records = self.queue.store.list(owner=caller.owner, limit=self.queue.max_queued + 64)
        return sum(1 for record in records if record.state == "queued")

    def find_checkpoint(self, name: str) -> Any:
        """The registry entry for ``name``, rescanning the folder once before giving up (as A1111)."""
        from pipelines.errors import ModelNotFoundError

        registry = self.services.registry
        try:
            return registry.find("checkpoint", name)
        except ModelNotFoundError:
            registry.refresh("checkpoint")
            return registry.find("checkpoint", name)

    def pin_checkpoint(self, override_settings: dict[str, Any]) -> None:
        """Name the selected model (--ckpt or POST /options) in a job that names none: a job that
        named another model leaves that one loaded, and a restart forgets it; neither may change
        what this job runs on."""
        selected = self.services.selected_checkpoint
        if selected and not override_settings.get("sd_model_checkpoint"):
            override_settings["sd_model_checkpoint"] = selected

    # files ----------------------------------------------------------------------------------
    def file_link(self, path: str | Path) -> str | None:
        """``/studio/v1/files/<path inside outputs>`` for a result file, None if it is elsewhere."""
        try:
            relative = Path(path).resolve().relative_to(self.outputs_dir.resolve())
        except (ValueError, OSError):
            return None
        return f"{FILES_PREFIX}/{quote(relative.as_posix())}"

    # models ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def device_exclusive(self) -> Iterator[None]:
        """One model switch or head-side preprocessor run at a time (jobs themselves run on the
        workers, which take a model switch between jobs)."""
        with self._model_switch_lock:
            yield


def read_image_base64(path: str | Path) -> str:
    """A saved output as A1111 returns it: base64 of the file, which carries the parameters chunk."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
