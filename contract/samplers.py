"""AUTOMATIC1111 sampler and schedule-type names mapped onto diffusers schedulers.

A1111 (k-diffusion) splits "how to step" (the *sampler*, e.g. ``DPM++ 2M``) from "which noise
levels to visit" (the *schedule type*, e.g. ``Karras``). diffusers folds both into one scheduler
class plus config flags. This module is the single table that translates between the two, so the
UI dropdowns, the ``/sdapi/v1/samplers`` and ``/sdapi/v1/schedulers`` endpoints, infotext import
and the engine all agree.

Rules the table follows:

* A sampler is listed only where diffusers has the *same algorithm*. Left out on purpose:
  ``DPM fast`` and ``DPM adaptive`` (A1111 runs them stochastically with eta=1, and "adaptive"
  chooses its own step sizes; no diffusers scheduler does either), ``Restart`` (restart-interval
  sampling has no diffusers scheduler) and ``DDIM CFG++`` (it renoises with the *unconditional*
  prediction, which a scheduler never sees).
* A schedule type is offered for a sampler only where its diffusers class has the matching config
  switch; anything else is a :class:`ValueError` naming the ``scheduler`` field.
* ``Automatic`` changes nothing about the noise schedule: the scheduler takes its schedule from
  the model's config, so ``build_scheduler("Euler", "Automatic", cfg)`` is exactly
  ``EulerDiscreteScheduler.from_config(cfg)``. In A1111 "Automatic" instead means "this sampler's
  preferred schedule" (Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, k-diffusion's uniform
  schedule for Euler); :func:`a1111_equivalent_schedule_type` names that choice for callers that
  want A1111's behaviour.
* Everything model-specific in the base config (``prediction_type`` for v-prediction models,
  ``rescale_betas_zero_snr``, beta schedule...) is kept: overrides only touch sampler knobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULE_TYPES",
    "SamplerSpec",
    "ScheduleTypeSpec",
    "UnknownSamplerError",
    "a1111_equivalent_schedule_type",
    "resolve_sampler_name",
    "resolve_schedule_type",
    "sampler_catalogue",
    "sampler_spec",
    "schedule_types_for",
    "scheduler_catalogue",
    "scheduler_overrides",
    "split_legacy_sampler_name",
]


class UnknownSamplerError(ValueError):
    """The ``sampler_name`` is neither a sampler name nor one of its aliases."""


@dataclass(frozen=True)
class ScheduleTypeSpec:
    """One entry of A1111's "Schedule type" dropdown (``modules/sd_schedulers.py`` field names)."""

    label: str
    name: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1.0
    need_inner_model: bool = False


# Order and names follow A1111's list; schedule types without a diffusers config switch
# (Polyexponential, KL Optimal, Align Your Steps, Simple, Normal, DDIM) are left out.
_SCHEDULE_TYPE_SPECS: tuple[ScheduleTypeSpec, ...] = (
    ScheduleTypeSpec("Automatic", "automatic"),
    ScheduleTypeSpec("Uniform", "uniform", need_inner_model=True),
    ScheduleTypeSpec("Karras", "karras", default_rho=7.0),
    ScheduleTypeSpec("Exponential", "exponential"),
    ScheduleTypeSpec("SGM Uniform", "sgm_uniform", aliases=("SGMUniform",), need_inner_model=True),
    ScheduleTypeSpec("Beta", "beta", need_inner_model=True),
)

SCHEDULE_TYPES: tuple[str, ...] = tuple(spec.label for spec in _SCHEDULE_TYPE_SPECS)

_SPACING_SCHEDULES = ("Uniform", "SGM Uniform")
_SIGMA_SCHEDULES = ("Karras", "Exponential", "Beta")
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SIGMA_FLAG_FOR = {
    "Karras": "use_karras_sigmas",
    "Exponential": "use_exponential_sigmas",
    "Beta": "use_beta_sigmas",
}
_SPACING_FOR = {"Uniform": "linspace", "SGM Uniform": "trailing"}


@dataclass(frozen=True)
class SamplerSpec:
    """How one A1111 sampler is built from diffusers.

    ``options`` are the scheduler config overrides that select the algorithm; ``spacing`` and
    ``sigma_schedules`` say whether the class has ``timestep_spacing`` and the
    ``use_*_sigmas`` switches; ``resets`` are extra schedule switches that an explicit schedule
    type turns off; ``a1111_options`` is what A1111's ``/sdapi/v1/samplers`` reports;
    ``extra_aliases`` are accepted when resolving (ComfyUI-style names) but not advertised.
    """

    name: str
    scheduler_class: str
    options: tuple[tuple[str, Any], ...] = ()
    aliases: tuple[str, ...] = ()
    extra_aliases: tuple[str, ...] = ()
    spacing: bool = True
    sigma_schedules: bool = True
    resets: tuple[str, ...] = ()
    a1111_options: tuple[tuple[str, str], ...] = ()
    a1111_schedule: str = "Automatic"
    needs_noise_seed: bool = False

    @property
    def schedule_types(self) -> tuple[str, ...]:
        return tuple(
            label
            for label in SCHEDULE_TYPES
            if label == "Automatic"
            or (label in _SPACING_SCHEDULES and self.spacing)
            or (label in _SIGMA_SCHEDULES and self.sigma_schedules)
        )


_DPMPP_MULTISTEP = "DPMSolverMultistepScheduler"
# A1111's DPM++ 2M/3M step to sigma 0 with a first-order step (k-diffusion returns the denoised
# prediction there); diffusers does the same with final_sigmas_type="zero", which forces the
# last step to first order. euler_at_final stays off so no other step is downgraded.
_DPMPP_FINAL = (("final_sigmas_type", "zero"), ("euler_at_final", False))
_TRUE = "True"

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "DPM++ 2M",
        _DPMPP_MULTISTEP,
        # 2nd-order multistep DPM-Solver++ with the midpoint correction is algebraically the same
        # update as k-diffusion's sample_dpmpp_2m. With solver_order=2 lower_order_final only
        # touches the last step, which final_sigmas_type="zero" already makes first order, so
        # keeping diffusers' default (True) changes nothing and matches A1111 at any step count.
        (
            ("algorithm_type", "dpmsolver++"),
            ("solver_order", 2),
            ("solver_type", "midpoint"),
            ("lower_order_final", True),
            *_DPMPP_FINAL,
        ),
        aliases=("k_dpmpp_2m",),
        extra_aliases=("dpmpp_2m",),
        resets=("use_lu_lambdas",),
        a1111_options=(("scheduler", "karras"),),
        a1111_schedule="Karras",
    ),
    SamplerSpec(
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        aliases=("k_dpmpp_sde",),
        extra_aliases=("dpmpp_sde",),
        a1111_options=(("scheduler", "karras"), ("second_order", _TRUE), ("brownian_noise", _TRUE)),
        a1111_schedule="Karras",
        needs_noise_seed=True,
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        _DPMPP_MULTISTEP,
        (
            ("algorithm_type", "sde-dpmsolver++"),
            ("solver_order", 2),
            ("solver_type", "midpoint"),
            ("lower_order_final", True),
            *_DPMPP_FINAL,
        ),
        aliases=("k_dpmpp_2m_sde",),
        extra_aliases=("dpmpp_2m_sde",),
        resets=("use_lu_lambdas",),
        a1111_options=(("scheduler", "exponential"), ("brownian_noise", _TRUE)),
        a1111_schedule="Exponential",
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun",
        _DPMPP_MULTISTEP,
        (
            ("algorithm_type", "sde-dpmsolver++"),
            ("solver_order", 2),
            ("solver_type", "heun"),
            ("lower_order_final", True),
            *_DPMPP_FINAL,
        ),
        aliases=("k_dpmpp_2m_sde_heun",),
        extra_aliases=("dpmpp_2m_sde_heun",),
        resets=("use_lu_lambdas",),
        a1111_options=(("scheduler", "exponential"), ("brownian_noise", _TRUE), ("solver_type", "heun")),
        a1111_schedule="Exponential",
    ),
    SamplerSpec(
        "DPM++ 2S a",
        # Closest diffusers relative: stochastic 2nd-order *singlestep* DPM-Solver++. It injects
        # SDE noise instead of A1111's ancestral split, and diffusers counts every model call as
        # a step, so N steps here cost about N/2 A1111 steps. The class has no timestep_spacing,
        # hence no Uniform/SGM Uniform.
        "DPMSolverSinglestepScheduler",
        (
            ("algorithm_type", "sde-dpmsolver++"),
            ("solver_order", 2),
            ("solver_type", "midpoint"),
            ("lower_order_final", True),
            ("final_sigmas_type", "zero"),
        ),
        aliases=("k_dpmpp_2s_a",),
        extra_aliases=("dpmpp_2s_ancestral",),
        spacing=False,
        a1111_options=(("scheduler", "karras"), ("uses_ensd", _TRUE), ("second_order", _TRUE)),
        a1111_schedule="Karras",
    ),
    SamplerSpec(
        "DPM++ 3M SDE",
        _DPMPP_MULTISTEP,
        # lower_order_final=False: diffusers would otherwise also drop the second-to-last step to
        # 2nd order below 15 steps, which k-diffusion's sample_dpmpp_3m_sde does not do.
        (
            ("algorithm_type", "sde-dpmsolver++"),
            ("solver_order", 3),
            ("solver_type", "midpoint"),
            ("lower_order_final", False),
            *_DPMPP_FINAL,
        ),
        aliases=("k_dpmpp_3m_sde",),
        extra_aliases=("dpmpp_3m_sde",),
        resets=("use_lu_lambdas",),
        a1111_options=(
            ("scheduler", "exponential"),
            ("discard_next_to_last_sigma", _TRUE),
            ("brownian_noise", _TRUE),
        ),
        a1111_schedule="Exponential",
    ),
    SamplerSpec(
        "Euler a",
        "EulerAncestralDiscreteScheduler",
        aliases=("k_euler_a", "k_euler_ancestral"),
        extra_aliases=("euler_ancestral",),
        sigma_schedules=False,
        a1111_options=(("uses_ensd", _TRUE),),
        a1111_schedule="Uniform",
    ),
    SamplerSpec(
        "Euler",
        "EulerDiscreteScheduler",
        aliases=("k_euler",),
        extra_aliases=("euler",),
        a1111_schedule="Uniform",
    ),
    SamplerSpec(
        "LMS",
        "LMSDiscreteScheduler",
        aliases=("k_lms",),
        extra_aliases=("lms",),
        a1111_schedule="Uniform",
    ),
    SamplerSpec(
        "Heun",
        "HeunDiscreteScheduler",
        aliases=("k_heun",),
        extra_aliases=("heun",),
        a1111_options=(("second_order", _TRUE),),
        a1111_schedule="Uniform",
    ),
    SamplerSpec(
        "DPM2",
        "KDPM2DiscreteScheduler",
        aliases=("k_dpm_2",),
        extra_aliases=("dpm_2",),
        a1111_options=(
            ("scheduler", "karras"),
            ("discard_next_to_last_sigma", _TRUE),
            ("second_order", _TRUE),
        ),
        a1111_schedule="Karras",
    ),
    SamplerSpec(
        "DPM2 a",
        "KDPM2AncestralDiscreteScheduler",
        aliases=("k_dpm_2_a",),
        extra_aliases=("dpm_2_ancestral",),
        a1111_options=(
            ("scheduler", "karras"),
            ("discard_next_to_last_sigma", _TRUE),
            ("uses_ensd", _TRUE),
            ("second_order", _TRUE),
        ),
        a1111_schedule="Karras",
    ),
    SamplerSpec(
        "DDIM",
        "DDIMScheduler",
        # A1111's DDIM never clips x0 and uses alphas_cumprod[0] as the last "previous" alpha.
        (("clip_sample", False), ("set_alpha_to_one", False)),
        aliases=("ddim",),
        sigma_schedules=False,
    ),
    SamplerSpec(
        "PLMS",
        # A1111's PLMS is pseudo linear multistep without PNDM's Runge-Kutta warm-up.
        "PNDMScheduler",
        (("skip_prk_steps", True),),
        aliases=("plms",),
        sigma_schedules=False,
    ),
    SamplerSpec(
        "UniPC",
        "UniPCMultistepScheduler",
        # A1111's defaults: variant bh1, order 3, lower order final, data prediction. A1111's UniPC
        # stops at t = 1/N (sigma_min), hence final_sigmas_type="sigma_min"; it is also required:
        # bh1's B(h) = h is infinite for a final step to sigma 0 and diffusers returns NaN.
        (
            ("solver_type", "bh1"),
            ("solver_order", 3),
            ("lower_order_final", True),
            ("predict_x0", True),
            ("final_sigmas_type", "sigma_min"),
        ),
        aliases=("unipc",),
        extra_aliases=("uni_pc",),
    ),
    SamplerSpec(
        "LCM",
        # LCMScheduler picks its own timesteps from the distillation schedule, so it takes no
        # schedule type.
        "LCMScheduler",
        aliases=("k_lcm",),
        extra_aliases=("lcm",),
        spacing=False,
        sigma_schedules=False,
    ),
    SamplerSpec(
        "DEIS",
        # Not in A1111 (ComfyUI and InvokeAI offer it); order 2 is diffusers' advice for guided
        # sampling.
        "DEISMultistepScheduler",
        (("solver_order", 2),),
        extra_aliases=("deis",),
    ),
)

SAMPLER_NAMES: tuple[str, ...] = tuple(spec.name for spec in SAMPLERS)


def _normalise(name: str) -> str:
    return " ".join(name.split()).casefold()


def _sampler_lookup() -> dict[str, SamplerSpec]:
    lookup: dict[str, SamplerSpec] = {}
    for spec in SAMPLERS:
        for key in (spec.name, *spec.aliases, *spec.extra_aliases):
            lookup[_normalise(key)] = spec
    return lookup


def _valid_sampler_hint() -> str:
    return ", ".join(SAMPLER_NAMES)


def sampler_spec(name: str) -> SamplerSpec:
    if not isinstance(name, str):
        raise UnknownSamplerError(
            f"sampler_name must be a string such as 'Euler a', got {type(name).__name__}. "
            f"Choose one of: {_valid_sampler_hint()}."
        )
    spec = _sampler_lookup().get(_normalise(name))
    if spec is None:
        raise UnknownSamplerError(
            f"sampler_name: unknown sampler {name!r}. Choose one of: {_valid_sampler_hint()} "
            "(A1111 aliases such as 'k_euler_a' work too)."
        )
    return spec


def resolve_sampler_name(name: str) -> str:
    """Canonical A1111 sampler name for a name or alias, ignoring case and extra spaces."""
    return sampler_spec(name).name


def resolve_schedule_type(name: str) -> str:
    """Canonical schedule-type label for a label, A1111 internal name or alias (any case).

    ``"karras"``, ``"Karras"`` and ``"KARRAS"`` all give ``"Karras"``; ``"sgm_uniform"`` and
    ``"SGMUniform"`` give ``"SGM Uniform"``.
    """
    if isinstance(name, str):
        wanted = _normalise(name)
        for spec in _SCHEDULE_TYPE_SPECS:
            if wanted in {_normalise(key) for key in (spec.label, spec.name, *spec.aliases)}:
                return spec.label
    raise ValueError(
        f"scheduler: unknown schedule type {name!r}. Choose one of: {', '.join(SCHEDULE_TYPES)}."
    )


def schedule_types_for(sampler: str) -> tuple[str, ...]:
    """Schedule types that ``sampler`` (name or alias) supports, in dropdown order."""
    return sampler_spec(sampler).schedule_types


def a1111_equivalent_schedule_type(sampler: str) -> str:
    """The schedule type here that reproduces what A1111's "Automatic" picks for ``sampler``.

    A1111 resolves "Automatic" to the sampler's preferred schedule (``options["scheduler"]`` in
    its sampler table) or, for k-diffusion samplers without one, to k-diffusion's uniform schedule.
    Timestep samplers (DDIM, PLMS, UniPC) and samplers A1111 does not have answer "Automatic".
    """
    return sampler_spec(sampler).a1111_schedule


def split_legacy_sampler_name(name: str) -> tuple[str, str | None]:
    """Split an old combined name such as ``"DPM++ 2M Karras"`` into sampler and schedule type.

    Before A1111 1.9 the schedule was part of the sampler name ("DPM++ 2M Karras",
    "k_dpmpp_2m_ka"); such names still fill Civitai. Returns ``(canonical sampler, schedule
    label or None)``; raises :class:`UnknownSamplerError` if no sampler is left after splitting.
    """
    stripped = " ".join(str(name).split())
    lookup = _sampler_lookup()
    direct = lookup.get(_normalise(stripped))
    if direct is not None:
        return direct.name, None
    lowered = _normalise(stripped)
    suffixes = [("_ka", "Karras"), ("_exp", "Exponential")]
    for spec in _SCHEDULE_TYPE_SPECS:
        suffixes.extend((" " + _normalise(text), spec.label) for text in (spec.label, *spec.aliases))
    # Longest first, so "... SGM Uniform" is not read as "... SGM" + "Uniform".
    for suffix, label in sorted(suffixes, key=lambda item: len(item[0]), reverse=True):
        if lowered.endswith(suffix):
            sampler = lookup.get(lowered[: -len(suffix)].strip())
            if sampler is not None:
                return sampler.name, label
    return sampler_spec(stripped).name, None


def _schedule_overrides(spec: SamplerSpec, schedule_type: str) -> dict[str, Any]:
    """Config overrides for one schedule type.

    An explicit schedule type first switches off every other schedule switch the base config may
    carry (a model whose config says ``use_karras_sigmas=True`` would otherwise clash with
    "Exponential"). Karras/Exponential/Beta also set ``timestep_spacing="linspace"`` where the
    class has it: Euler, LMS, Heun, DPM2 and DPM++ SDE take the sigma range of those schedules from
    the spaced timesteps, and only linspace spans the full trained range [sigma(0), sigma(999)]
    that k-diffusion uses (SDXL's "leading" spacing would cap sigma_max near sigma(951)).

    "Uniform" (linspace) reproduces k-diffusion's default timesteps exactly for the k-diffusion
    ports (Euler, Euler a, LMS, Heun, DPM2, DPM++ SDE); sigmas between integer timesteps differ
    slightly because diffusers interpolates sigma linearly where k-diffusion interpolates
    log-sigma. The multistep solvers' linspace (DPM++ 2M/3M, UniPC, DEIS) leaves out t=0 and
    steps from t~50 straight to sigma 0, which makes it nearly the same as "SGM Uniform".
    """
    if schedule_type == "Automatic":
        return {}
    overrides: dict[str, Any] = {}
    if spec.sigma_schedules:
        overrides.update(dict.fromkeys(_SIGMA_FLAGS, False))
    overrides.update(dict.fromkeys(spec.resets, False))
    if schedule_type in _SPACING_FOR:
        overrides["timestep_spacing"] = _SPACING_FOR[schedule_type]
    else:
        overrides[_SIGMA_FLAG_FOR[schedule_type]] = True
        if spec.spacing:
            overrides["timestep_spacing"] = "linspace"
    return overrides


def scheduler_overrides(
    sampler_name: str, schedule_type: str, *, noise_seed: int | None = None
) -> dict[str, Any]:
    """The exact ``from_config`` keyword overrides :func:`build_scheduler` uses (no diffusers import)."""
    spec = sampler_spec(sampler_name)
    label = resolve_schedule_type(schedule_type)
    if label not in spec.schedule_types:
        raise ValueError(
            f"scheduler: schedule type {label!r} is not available for sampler {spec.name!r}. "
            f"Choose one of: {', '.join(spec.schedule_types)}."
        )
    overrides = dict(spec.options)
    overrides.update(_schedule_overrides(spec, label))
    if spec.needs_noise_seed and noise_seed is not None:
        overrides["noise_sampler_seed"] = int(noise_seed)
    return overrides


def sampler_catalogue() -> list[dict[str, Any]]:
    """A1111's ``GET /sdapi/v1/samplers`` body: ``[{"name", "aliases", "options"}, ...]``.

    ``options`` are A1111's own flags for that sampler (string values, as A1111 returns them);
    ``options["scheduler"]`` is A1111's preferred schedule, see :func:`a1111_equivalent_schedule_type`.
    """
    return [
        {"name": spec.name, "aliases": list(spec.aliases), "options": dict(spec.a1111_options)}
        for spec in SAMPLERS
    ]


def scheduler_catalogue() -> list[dict[str, Any]]:
    """A1111's ``GET /sdapi/v1/schedulers`` body for the schedule types offered here."""
    return [
        {
            "name": spec.name,
            "label": spec.label,
            "aliases": list(spec.aliases) if spec.aliases else None,
            "default_rho": spec.default_rho,
            "need_inner_model": spec.need_inner_model,
        }
        for spec in _SCHEDULE_TYPE_SPECS
    ]
