"""A learned job-cost model: how long a job will take on a given worker, and how much GPU memory.

Per worker and model family, seconds are linear in a few features of the request (numpy least
squares, refitted as runs are recorded):

* ``work``: sampling steps x megapixels x images (the UNet's share, by far the largest);
* ``hires``: the hires fix's second pass, the same product at its size and steps;
* ``control``: ``work`` again for each ControlNet unit (a ControlNet costs about a UNet pass);
* ``load``: 1 when the worker does not have the job's checkpoint loaded (load time);
* a constant (VAE decode, saving, transfer).

Until a worker has enough runs of its own, its prediction borrows the pooled fit of all workers,
scaled by how fast this worker has been so far; with no data at all, a default rate stands in (so
the first jobs go to idle workers in turn, and each worker's first run seeds its fit). Peak GPU memory is
fitted the same way from what workers report. Every finished job records the error of the
prediction made when it started; the Queue/Cluster views show the recent mean.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("constant", "work", "hires", "control", "load")
DEFAULT_SECONDS_PER_WORK = 0.6
"""Seconds per step x megapixel x image before anything is measured (an RTX 3060-class GPU at SD1.5)."""
DEFAULT_LOAD_SECONDS = 15.0
MIN_OWN_RUNS = 6
"""Runs of a worker/family before its own fit is used alone."""
HISTORY = 200
"""Runs kept per worker and family (the newest)."""


def request_features(request: dict[str, Any], *, loaded: bool) -> np.ndarray:
    """The feature vector (:data:`FEATURES`) of a job request as the queue stores it."""
    width = float(request.get("width") or 512)
    height = float(request.get("height") or 512)
    images = max(1, int(request.get("batch_size") or 1)) * max(1, int(request.get("n_iter") or 1))
    steps = float(request.get("steps") or 20)
    mode = request.get("mode", "txt2img")
    if mode == "img2img":
        steps *= float(request.get("denoising_strength") or 0.75)
    if mode in ("extras", "talking_head"):
        steps = 1.0
    megapixels = width * height / 1e6
    work = steps * megapixels * images
    hires = 0.0
    if request.get("enable_hr"):
        scale = float(request.get("hr_scale") or 2.0)
        hr_w = float(request.get("hr_resize_x") or width * scale)
        hr_h = float(request.get("hr_resize_y") or height * scale)
        hr_steps = float(request.get("hr_second_pass_steps") or steps) * float(
            request.get("denoising_strength") or 0.7
        )
        hires = hr_steps * hr_w * hr_h / 1e6 * images
    units = [u for u in request.get("controlnet_units") or [] if (u or {}).get("enabled", True)]
    control = work * len(units)
    return np.array([1.0, work, hires, control, 0.0 if loaded else 1.0])


@dataclass
class _Runs:
    features: deque[np.ndarray] = field(default_factory=lambda: deque(maxlen=HISTORY))
    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    vram: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    vram_features: deque[np.ndarray] = field(default_factory=lambda: deque(maxlen=HISTORY))


def _fit(features: list[np.ndarray], targets: list[float]) -> np.ndarray | None:
    """Least squares with a little ridge (few runs, collinear features) and no negative costs."""
    if not features:
        return None
    x = np.vstack(features)
    y = np.asarray(targets, dtype=float)
    ridge = 1e-3 * np.eye(x.shape[1])
    coefficients = np.linalg.solve(x.T @ x + ridge, x.T @ y)
    return np.clip(coefficients, 0.0, None)


class JobCostModel:
    """Thread-safe; one per studio (the queue records into it and asks it)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], _Runs] = defaultdict(_Runs)
        self._errors: deque[float] = deque(maxlen=1000)
        self._lock = threading.Lock()

    # learning ----------------------------------------------------------------------------------
    def record(
        self,
        worker: str,
        family: str | None,
        features: np.ndarray,
        seconds: float,
        *,
        predicted: float | None = None,
        peak_vram_bytes: float | None = None,
    ) -> None:
        with self._lock:
            runs = self._runs[(worker, family or "any")]
            runs.features.append(features)
            runs.seconds.append(float(seconds))
            if peak_vram_bytes:
                runs.vram_features.append(features)
                runs.vram.append(float(peak_vram_bytes))
            if predicted is not None and seconds > 0:
                self._errors.append(abs(predicted - seconds) / seconds)

    # predicting --------------------------------------------------------------------------------
    def predict_seconds(self, worker: str, family: str | None, features: np.ndarray) -> float:
        with self._lock:
            own = self._runs.get((worker, family or "any"))
            if own is None or len(own.seconds) < MIN_OWN_RUNS:
                own = self._merged(lambda key: key[0] == worker) if own is None else own
            pooled = self._merged(lambda key: True)
        coefficients = _fit(list(own.features), list(own.seconds)) if own and own.seconds else None
        if coefficients is not None and len(own.seconds) >= MIN_OWN_RUNS:
            return float(max(0.0, features @ coefficients))
        pooled_fit = _fit(list(pooled.features), list(pooled.seconds)) if pooled.seconds else None
        if pooled_fit is None:
            default = np.array(
                [
                    1.0,
                    DEFAULT_SECONDS_PER_WORK,
                    DEFAULT_SECONDS_PER_WORK,
                    DEFAULT_SECONDS_PER_WORK,
                    DEFAULT_LOAD_SECONDS,
                ]
            )
            return float(features @ default)
        estimate = float(max(0.0, features @ pooled_fit))
        if own is not None and own.seconds:  # scale the pooled fit by this worker's speed so far
            ratios = [
                s / max(1e-6, float(f @ pooled_fit)) for f, s in zip(own.features, own.seconds, strict=True)
            ]
            estimate *= float(np.median(ratios))
        return estimate

    def predict_vram(self, worker: str, family: str | None, features: np.ndarray) -> float | None:
        """Peak GPU bytes, or None before this worker reported any (a CPU worker never does)."""
        with self._lock:
            runs = self._runs.get((worker, family or "any"))
            if runs is None or not runs.vram:
                runs = self._merged(lambda key: key[0] == worker)
            pairs = (list(runs.vram_features), list(runs.vram))
        if not pairs[1]:
            return None
        fit = _fit(*pairs)
        return None if fit is None else float(features @ fit)

    def _merged(self, keep: Any) -> _Runs:
        merged = _Runs(features=deque(maxlen=None), seconds=deque(maxlen=None))
        merged.vram, merged.vram_features = deque(), deque()
        for key, runs in self._runs.items():
            if keep(key):
                merged.features.extend(runs.features)
                merged.seconds.extend(runs.seconds)
                merged.vram.extend(runs.vram)
                merged.vram_features.extend(runs.vram_features)
        return merged

    # reporting ---------------------------------------------------------------------------------
    def mean_relative_error(self, last: int = 20) -> float | None:
        """Mean |predicted - actual| / actual over the last ``last`` finished jobs."""
        with self._lock:
            recent = list(self._errors)[-last:]
        return float(sum(recent) / len(recent)) if recent else None

    def errors(self) -> list[float]:
        with self._lock:
            return list(self._errors)

    def runs(self) -> int:
        with self._lock:
            return sum(len(runs.seconds) for runs in self._runs.values())


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
