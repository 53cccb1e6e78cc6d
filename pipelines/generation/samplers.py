"""Builds the diffusers scheduler for an A1111 sampler + schedule type.

The name tables (samplers, schedule types, aliases, the config overrides each one needs) are part
of the job contract (:mod:`contract.samplers`), so validating a request never imports diffusers;
this module is the one place where a name becomes a scheduler object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contract.samplers import sampler_spec, scheduler_overrides

if TYPE_CHECKING:
    from collections.abc import Mapping

    from diffusers import SchedulerMixin


def build_scheduler(
    sampler_name: str,
    schedule_type: str,
    base_config: Mapping[str, Any],
    *,
    noise_seed: int | None = None,
) -> SchedulerMixin:
    """Build the diffusers scheduler for an A1111 sampler + schedule type.

    ``base_config`` is the model's scheduler config (``pipe.scheduler.config``); it is passed to
    ``SchedulerClass.from_config`` with only the sampler's overrides on top, so model properties
    such as ``prediction_type="v_prediction"`` survive.

    ``noise_seed`` matters for "DPM++ SDE" only: its Brownian-tree noise is seeded from this value
    (A1111 seeds it with the image seed). Without it diffusers draws the tree seed from torch's
    global RNG and the image is not reproducible. Other samplers ignore it; ancestral and SDE
    samplers take their noise from the generator the pipeline passes to ``step``.
    """
    import diffusers

    spec = sampler_spec(sampler_name)
    overrides = scheduler_overrides(spec.name, schedule_type, noise_seed=noise_seed)
    scheduler_class = getattr(diffusers, spec.scheduler_class)
    try:
        return scheduler_class.from_config(dict(base_config), **overrides)
    except ImportError as exc:
        raise ImportError(
            f"sampler_name {spec.name!r} needs an optional package that is missing ({exc}). "
            "Install the project requirements: pip install -r requirements.txt"
        ) from exc
