"""The cluster's workers: one :class:`RayWorkerHandle` per worker slot each live node declares,
kept in step with the cluster as PCs join, leave and come back.

A node declares ``sdstudio_worker: N`` (its GPUs times ``--gpu-share``, or 1 for a CPU node); the pool
watches Ray's node table every ``poll_seconds`` and, with the head's health checks tuned to one
second (``app.cluster.launcher``), notices a PC that is switched off within a few seconds. Workers
of a dead node stay listed (as gone) for the Queue/Cluster tabs; a node that comes back is a new
node to Ray and gets new workers.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

from app.cluster.handle import WORKER_RESOURCE, RayWorkerHandle
from app.workers.handles import WorkerHandle, WorkerListener
from app.workers.pool import WorkerPool

if TYPE_CHECKING:
    from app.settings import StudioSettings

log = logging.getLogger(__name__)


def connect(address: str, token: str | None) -> None:
    """Join this process to the cluster as its driver (token checked first, with a clear refusal)."""
    import ray

    from app.cluster.security import check_token

    if ray.is_initialized():
        return
    check_token(address, token)
    ray.init(address=address, namespace="sdstudio", logging_level=logging.WARNING, log_to_driver=False)


class ClusterWorkerPool(WorkerPool):
    """Workers on every node of a Ray cluster, the head's own included."""

    def __init__(self, settings: StudioSettings, *, poll_seconds: float = 1.0) -> None:
        self.settings = settings
        self.handles: list[WorkerHandle] = []
        self._lock = threading.Lock()
        self._nodes: dict[str, bool] = {}  # node id -> alive, as last seen
        self._listener: WorkerListener | None = None
        self._stop = threading.Event()
        self._poll_seconds = poll_seconds
        self._monitor: threading.Thread | None = None
        self._library: Any = None

    def start(self, listener: WorkerListener) -> None:
        self._listener = listener
        if not self.settings.cluster_shared_models:
            from app.cluster.model_sync import start_library

            self._library = start_library(self.settings.model_dump_json())  # before any worker asks
        self.refresh()
        self._monitor = threading.Thread(target=self._watch, name="cluster-nodes", daemon=True)
        self._monitor.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for handle in list(self.handles):
            handle.stop(timeout)

    def idle(self) -> list[WorkerHandle]:
        with self._lock:
            return [handle for handle in self.handles if handle.idle]

    def get(self, worker_id: str) -> WorkerHandle | None:
        with self._lock:
            return next((handle for handle in self.handles if handle.worker_id == worker_id), None)

    def states(self) -> list[Any]:
        with self._lock:
            return [handle.state for handle in self.handles]

    def apply_settings(self, settings: StudioSettings) -> None:
        self.settings = settings
        for handle in list(self.handles):
            handle.settings = settings  # type: ignore[attr-defined]

    # following the cluster ---------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except Exception:  # the GCS restarting, a network blip: try again next time
                log.warning("could not read the cluster's nodes", exc_info=True)

    def refresh(self) -> None:
        """Start workers on nodes that joined; mark those of nodes that died as gone."""
        import ray

        for node in ray.nodes():
            node_id = str(node["NodeID"])
            alive = bool(node.get("Alive"))
            slots = int((node.get("Resources") or {}).get(WORKER_RESOURCE, 0))
            was_alive = self._nodes.get(node_id)
            if was_alive == alive or (alive and not slots):
                continue  # a node without worker slots is no business of ours
            self._nodes[node_id] = alive
            if alive:
                self._add_node(node_id, node, slots)
            elif was_alive:  # a dead node lists no resources any more: known by its id
                self._node_died(node_id, node)

    def _add_node(self, node_id: str, node: dict[str, Any], slots: int) -> None:
        host = str(node.get("NodeName") or node.get("NodeManagerAddress") or node_id[:8])
        resources = node.get("Resources") or {}
        gpus = float(resources.get("GPU", 0))
        per_worker_gpus = min(1.0, gpus / slots) if gpus else 0.0
        new: list[RayWorkerHandle] = []
        with self._lock:
            taken = {handle.worker_id for handle in self.handles}
            for index in range(slots):
                worker_id = _worker_name(host, index, taken)
                taken.add(worker_id)
                new.append(
                    RayWorkerHandle(
                        self.settings, worker_id, node_id=node_id, host=host, gpus=per_worker_gpus
                    )
                )
            self.handles.extend(new)
        log.info("cluster node %s joined with %d worker(s)", host, slots)
        if self._listener is not None:
            for handle in new:
                handle.start(self._listener)

    def _node_died(self, node_id: str, node: dict[str, Any]) -> None:
        host = str(node.get("NodeName") or node.get("NodeManagerAddress") or node_id[:8])
        log.warning("cluster node %s is gone", host)
        with self._lock:
            lost = [h for h in self.handles if isinstance(h, RayWorkerHandle) and h.node_id == node_id]
        for handle in lost:
            handle.node_gone()
            if handle.current_job is not None:
                # The running call fails too (Ray notices the dead node); whichever comes first requeues.
                with contextlib.suppress(Exception):
                    handle._lost(ConnectionError(f"node {host} died"), handle._generation)


def _worker_name(host: str, index: int, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", host).strip("-") or "node"
    name, n = f"{base}-w{index}", 1
    while name in taken:
        name, n = f"{base}-w{index}-{n}", n + 1
    return name
