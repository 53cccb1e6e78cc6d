"""The head's side of a worker actor: the same :class:`~app.workers.handles.WorkerHandle` the queue
drives for a local worker process, over Ray calls instead of a pipe.

Ray does not rerun a call whose actor or node died; the handle turns any such failure into
``on_worker_exit`` with a reason a user understands, and the durable queue requeues the job (bounded
attempts), exactly as when a local worker process dies. The actor is killed first, so a node that
was only unreachable for a while cannot finish the job a second time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from app.workers.handles import WorkerHandle, WorkerListener
from contract.worker import (
    ControlJob,
    RunJob,
    SetDefaultModel,
    Shutdown,
    decode_worker_message,
    encode_message,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from app.settings import StudioSettings

log = logging.getLogger(__name__)

WORKER_RESOURCE = "sdstudio_worker"
"""The custom Ray resource a node declares, one unit per worker it hosts (GPUs x --gpu-share)."""
READY_TIMEOUT = 900.0
"""Seconds a new actor may take to import torch/diffusers and build its runtime on a slow PC."""


def describe_ray_failure(error: BaseException, host: str) -> str:
    """A Ray failure in the words of the Queue tab and the job's error."""
    name = type(error).__name__
    text = str(error)
    if name == "OutOfMemoryError" or "memory monitor" in text.lower():
        return f"Ray's memory monitor stopped the worker on {host} (that PC ran low on RAM)"
    if name == "NodeDiedError" or (
        "node" in text.lower() and ("died" in text.lower() or "dead" in text.lower())
    ):
        return f"the PC {host} left the cluster (switched off, disconnected or its Ray node stopped)"
    if name in ("ActorUnavailableError",):
        return f"the worker on {host} became unreachable"
    if name in ("ActorDiedError", "WorkerCrashedError", "RayActorError"):
        return f"the worker process on {host} died"
    return f"the worker on {host} failed ({name})"


class RayWorkerHandle(WorkerHandle):
    """One worker actor pinned to one node of the cluster."""

    remote = True

    def __init__(
        self, settings: StudioSettings, worker_id: str, *, node_id: str, host: str, gpus: float
    ) -> None:
        super().__init__(worker_id, "auto" if gpus else "cpu")
        self.settings = settings
        self.node_id = node_id
        self.host = host
        self.gpus = gpus
        self.state = self.state.model_copy(update={"kind": "ray", "host": host})
        self.node_alive = True
        self._actor: Any = None
        self._starting = False
        self._lock = threading.Lock()
        self._generation = 0  # bumped by each start/stop: late failures of an old actor are ignored

    # lifecycle -------------------------------------------------------------------------------
    def start(self, listener: WorkerListener) -> None:
        """Create the actor on its node in the background; :class:`WorkerReady` marks it usable. A node
        that is gone is not started (the cluster pool starts it again when the node is back)."""
        self._listener = listener
        with self._lock:
            if self._starting or not self.node_alive:
                return
            self._starting = True
            self._generation += 1
            generation = self._generation
        self.ready = False
        threading.Thread(
            target=self._create, args=(generation,), name=f"ray-{self.worker_id}", daemon=True
        ).start()

    def _create(self, generation: int) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from app.cluster.actor import WorkerActor

        try:
            remote_class = ray.remote(WorkerActor)
            actor = remote_class.options(
                name=f"sdstudio-worker-{self.worker_id}-{generation}",
                num_cpus=0,
                num_gpus=self.gpus,
                resources={WORKER_RESOURCE: 1},
                max_concurrency=8,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=self.node_id, soft=False),
            ).remote(self.settings.model_dump_json(), self.worker_id, self.device)
            with self._lock:
                self._actor = actor
            data = ray.get(actor.ready.remote(), timeout=READY_TIMEOUT)
        except Exception as exc:
            log.error("worker %s on %s did not start: %s", self.worker_id, self.host, exc)
            with self._lock:
                self._starting = False
            self._kill_actor()
            return
        with self._lock:
            self._starting = False
            if generation != self._generation:
                return
        self._deliver(decode_worker_message(data))

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._generation += 1
        self.ready = False
        self._kill_actor()

    def _kill_actor(self) -> None:
        with self._lock:
            actor, self._actor = self._actor, None
        if actor is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def node_gone(self) -> None:
        """The cluster pool saw this worker's node die: stop dispatching to it at once."""
        self.node_alive = False
        self.ready = False
        self.state = self.state.model_copy(update={"alive": False})

    # messages --------------------------------------------------------------------------------
    def send(self, message: BaseModel) -> None:
        with self._lock:
            actor, generation = self._actor, self._generation
        if actor is None or (not self.ready and not isinstance(message, Shutdown)):
            raise ConnectionError(f"worker {self.worker_id} on {self.host} is not running")
        if isinstance(message, RunJob):
            call = actor.run.options(num_returns="streaming").remote(encode_message(message))
            threading.Thread(
                target=self._follow, args=(call, generation), name=f"ray-{self.worker_id}-job", daemon=True
            ).start()
        elif isinstance(message, ControlJob):
            actor.control.remote(message.job_id, message.action)
        elif isinstance(message, SetDefaultModel):
            call = actor.set_default_model.remote(encode_message(message))
            threading.Thread(target=self._answer, args=(call, generation), daemon=True).start()
        elif isinstance(message, Shutdown):
            self.stop()

    def _follow(self, call: Any, generation: int) -> None:
        """Deliver a job's messages as the actor yields them; a Ray failure ends the worker."""
        import ray

        try:
            for ref in call:
                self._deliver(decode_worker_message(ray.get(ref)))
        except Exception as exc:
            self._lost(exc, generation)

    def _answer(self, call: Any, generation: int) -> None:
        import ray

        try:
            self._deliver(decode_worker_message(ray.get(call)))
        except Exception as exc:
            self._lost(exc, generation)

    def _lost(self, error: BaseException, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # an actor we already replaced or stopped
            self._generation += 1
        reason = describe_ray_failure(error, self.host)
        log.warning("worker %s: %s (%s)", self.worker_id, reason, error)
        self.ready = False
        self.state = self.state.model_copy(update={"alive": False, "busy_job": None})
        self._kill_actor()  # before the job is requeued: it must not finish twice
        if self._listener is not None:
            self._listener.on_worker_exit(self, reason)
