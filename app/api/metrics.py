"""``GET /metrics``: the studio in Prometheus' text format (``prometheus-client``), behind the API's auth.

Read at scrape time from the queue (no global registry, nothing counted twice): jobs by state from
the durable store, a histogram of job seconds by outcome, requeues after worker crashes, each
worker's busy fraction and whether it is up, and the cost model's recent prediction error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Response

if TYPE_CHECKING:
    from app.api.context import ApiContext

SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class StudioCollector:
    """A prometheus-client collector over one studio's queue."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self.queue = self.context.queue
        counts = self.queue.store.counts_by_state()
        jobs = GaugeMetricFamily("sdstudio_jobs", "Jobs in the durable queue by state.", labels=["state"])
        for state in sorted(set(JOB_STATES) | set(counts)):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        stats = self.queue.stats
        seconds = HistogramMetricFamily(
            "sdstudio_job_seconds", "Seconds from dispatch to finish, by outcome.", labels=["state"]
        )
        for state in sorted({state for state, _ in stats.durations}):
            values = [value for done_state, value in stats.durations if done_state == state]
            buckets = [(_bound(bound), sum(1 for v in values if v <= bound)) for bound in SECONDS_BUCKETS]
            seconds.add_metric([state], buckets, sum_value=sum(values))
        yield seconds

        requeues = CounterMetricFamily("sdstudio_requeues", "Jobs queued again after their worker died.")
        requeues.add_metric([], stats.requeues)
        yield requeues
        failures = CounterMetricFamily(
            "sdstudio_crash_failures", "Jobs failed after stopping their worker too often."
        )
        failures.add_metric([], stats.crash_failures)
        yield failures

        busy = GaugeMetricFamily(
            "sdstudio_worker_busy_fraction", "Share of time a worker ran jobs.", labels=["worker", "host"]
        )
        up = GaugeMetricFamily(
            "sdstudio_worker_up", "1 when a worker is ready or running.", labels=["worker", "host"]
        )
        for handle in list(self.queue.workers.handles):
            labels = [handle.worker_id, handle.state.host or "local"]
            busy.add_metric(labels, stats.worker(handle.worker_id).busy_fraction())
            up.add_metric(labels, 1.0 if handle.ready or handle.current_job else 0.0)
        yield busy
        yield up

        error = self.queue.cost_model.mean_relative_error()
        if error is not None:
            gauge = GaugeMetricFamily(
                "sdstudio_cost_model_relative_error", "Mean |predicted - actual| / actual, last 20 jobs."
            )
            gauge.add_metric([], error)
            yield gauge


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else f"{value:g}"


def metrics_router(context: ApiContext) -> APIRouter:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StudioCollector(context))
    router = APIRouter(dependencies=[Depends(context.auth.require_user)])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
