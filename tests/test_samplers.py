"""A1111 sampler / schedule-type table -> diffusers schedulers."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contract import samplers
from contract.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    SCHEDULE_TYPES,
    UnknownSamplerError,
    a1111_equivalent_schedule_type,
    resolve_sampler_name,
    resolve_schedule_type,
    sampler_catalogue,
    schedule_types_for,
    scheduler_catalogue,
    scheduler_overrides,
    split_legacy_sampler_name,
)
from pipelines.generation.samplers import build_scheduler

# stable-diffusion-v1-5 scheduler/scheduler_config.json (a diffusers 0.6 PNDM config: no
# timestep_spacing key, so every class falls back to its own default spacing).
SD15_PNDM_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# SDXL-style Euler config: explicit "leading" spacing.
SDXL_EULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

ALL_COMBINATIONS = [(name, schedule) for name in SAMPLER_NAMES for schedule in schedule_types_for(name)]


def _kdiffusion_sigma_range() -> tuple[float, float]:
    """sigma(0) and sigma(999) of SD's scaled-linear betas, computed independently of diffusers."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return float(sigmas[0]), float(sigmas[-1])


def _run_denoise_loop(scheduler: Any, steps: int = 20) -> torch.Tensor:
    """Drive the scheduler with a fake model (x * 0.1) and a seeded CPU generator."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        noise_pred = model_input * 0.1
        extra = {"generator": generator} if takes_generator else {}
        sample = scheduler.step(noise_pred, timestep, sample, **extra).prev_sample
    return sample


def test_euler_automatic_is_exactly_plain_from_config() -> None:
    from diffusers import EulerDiscreteScheduler

    ours = build_scheduler("Euler", "Automatic", SD15_PNDM_CONFIG)
    plain = EulerDiscreteScheduler.from_config(SD15_PNDM_CONFIG)
    assert type(ours) is EulerDiscreteScheduler
    assert dict(ours.config) == dict(plain.config)
    ours.set_timesteps(20)
    plain.set_timesteps(20)
    assert torch.equal(ours.timesteps, plain.timesteps)
    assert torch.equal(ours.sigmas, plain.sigmas)


def test_automatic_adds_no_schedule_overrides() -> None:
    for name in SAMPLER_NAMES:
        spec = next(spec for spec in SAMPLERS if spec.name == name)
        assert scheduler_overrides(name, "Automatic") == dict(spec.options)
    assert scheduler_overrides("Euler", "Automatic") == {}


@pytest.mark.parametrize(("sampler_name", "schedule_type"), ALL_COMBINATIONS)
def test_every_combination_builds_and_runs(sampler_name: str, schedule_type: str) -> None:
    import diffusers

    spec = next(spec for spec in SAMPLERS if spec.name == sampler_name)
    scheduler_class = getattr(diffusers, spec.scheduler_class)
    overrides = scheduler_overrides(sampler_name, schedule_type, noise_seed=7)
    accepted = set(inspect.signature(scheduler_class.__init__).parameters)
    assert set(overrides) <= accepted, f"{scheduler_class.__name__} would silently ignore some overrides"

    scheduler = build_scheduler(sampler_name, schedule_type, SD15_PNDM_CONFIG, noise_seed=7)
    assert type(scheduler) is scheduler_class
    for key, value in overrides.items():
        assert scheduler.config[key] == value
    result = _run_denoise_loop(scheduler)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_model_config_entries_survive(sampler_name: str) -> None:
    v_config = {**SDXL_EULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    types = schedule_types_for(sampler_name)
    for schedule_type in {types[0], types[-1]}:
        scheduler = build_scheduler(sampler_name, schedule_type, v_config)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_schedule == "scaled_linear"
        if "rescale_betas_zero_snr" in scheduler.config:
            assert scheduler.config.rescale_betas_zero_snr is True


def test_karras_exponential_beta_span_the_full_trained_sigma_range() -> None:
    """Like k-diffusion, even when the model config uses "leading" spacing (SDXL)."""
    sigma_min, sigma_max = _kdiffusion_sigma_range()
    rho = 7.0
    ramp = np.linspace(0, 1, 20)
    karras = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    exponential = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), 20))

    for name in ("Euler", "LMS", "DPM++ 2M", "UniPC"):
        scheduler = build_scheduler(name, "Karras", SDXL_EULER_CONFIG)
        scheduler.set_timesteps(20)
        np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), karras, rtol=1e-4)
        # UniPC stops at sigma_min like A1111's UniPC; the k-diffusion ports step to 0.
        assert float(scheduler.sigmas[-1]) == (pytest.approx(sigma_min, rel=1e-4) if name == "UniPC" else 0.0)

    scheduler = build_scheduler("Euler", "Exponential", SDXL_EULER_CONFIG)
    scheduler.set_timesteps(20)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), exponential, rtol=1e-4)

    scheduler = build_scheduler("Euler", "Beta", SDXL_EULER_CONFIG)
    scheduler.set_timesteps(20)
    assert float(scheduler.sigmas[0]) == pytest.approx(sigma_max, rel=1e-4)
    assert float(scheduler.sigmas[-2]) == pytest.approx(sigma_min, rel=1e-4)


def test_uniform_is_kdiffusion_linspace_and_sgm_uniform_is_trailing() -> None:
    uniform = build_scheduler("Euler", "Uniform", SDXL_EULER_CONFIG)
    uniform.set_timesteps(20)
    np.testing.assert_allclose(uniform.timesteps.numpy(), np.linspace(999, 0, 20), atol=1e-3)

    automatic = build_scheduler("Euler", "Automatic", SDXL_EULER_CONFIG)
    automatic.set_timesteps(20)
    assert float(automatic.timesteps[0]) == 951.0  # the model's own "leading" spacing, untouched

    sgm = build_scheduler("Euler", "SGM Uniform", SDXL_EULER_CONFIG)
    sgm.set_timesteps(20)
    np.testing.assert_allclose(sgm.timesteps.numpy(), np.linspace(999, 0, 21)[:-1], atol=1.0)


def test_explicit_schedule_type_clears_schedule_flags_from_the_model_config() -> None:
    karras_config = {**SDXL_EULER_CONFIG, "use_karras_sigmas": True}
    assert build_scheduler("Euler", "Automatic", karras_config).config.use_karras_sigmas is True
    exponential = build_scheduler("Euler", "Exponential", karras_config)
    assert exponential.config.use_karras_sigmas is False
    assert exponential.config.use_exponential_sigmas is True
    exponential.set_timesteps(20)
    uniform = build_scheduler("DPM++ 2M", "Uniform", {**karras_config, "use_lu_lambdas": True})
    assert uniform.config.use_karras_sigmas is False
    assert uniform.config.use_lu_lambdas is False


def test_dpm_solver_variants_select_the_right_algorithm() -> None:
    expectations = {
        "DPM++ 2M": ("dpmsolver++", 2, "midpoint"),
        "DPM++ 2M SDE": ("sde-dpmsolver++", 2, "midpoint"),
        "DPM++ 2M SDE Heun": ("sde-dpmsolver++", 2, "heun"),
        "DPM++ 3M SDE": ("sde-dpmsolver++", 3, "midpoint"),
    }
    # A model config saved with other DPM settings must not leak into the chosen sampler.
    foreign = {**SD15_PNDM_CONFIG, "algorithm_type": "dpmsolver", "solver_order": 1, "euler_at_final": True}
    for name, (algorithm, order, solver_type) in expectations.items():
        config = build_scheduler(name, "Karras", foreign).config
        assert (config.algorithm_type, config.solver_order, config.solver_type) == (
            algorithm,
            order,
            solver_type,
        )
        assert config.final_sigmas_type == "zero"
        assert config.euler_at_final is False
    assert build_scheduler("DPM++ 3M SDE", "Automatic", foreign).config.lower_order_final is False


def test_dpmpp_sde_noise_seed_makes_it_reproducible() -> None:
    first = _run_denoise_loop(
        build_scheduler("DPM++ SDE", "Karras", SD15_PNDM_CONFIG, noise_seed=1234), steps=4
    )
    second = _run_denoise_loop(
        build_scheduler("DPM++ SDE", "Karras", SD15_PNDM_CONFIG, noise_seed=1234), steps=4
    )
    other = _run_denoise_loop(
        build_scheduler("DPM++ SDE", "Karras", SD15_PNDM_CONFIG, noise_seed=99), steps=4
    )
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Samplers without a Brownian tree ignore the seed.
    assert "noise_sampler_seed" not in scheduler_overrides("Euler a", "Automatic", noise_seed=3)


def test_ancestral_samplers_follow_the_pipeline_generator() -> None:
    runs = [
        _run_denoise_loop(build_scheduler("Euler a", "Automatic", SD15_PNDM_CONFIG), steps=5)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("Euler a", "Euler a"),
        ("k_euler_a", "Euler a"),
        ("K_EULER_ANCESTRAL", "Euler a"),
        ("euler_ancestral", "Euler a"),
        ("  euler   A ", "Euler a"),
        ("k_euler", "Euler"),
        ("dpm++ 2m", "DPM++ 2M"),
        ("k_dpmpp_2m", "DPM++ 2M"),
        ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"),
        ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
        ("k_dpm_2_a", "DPM2 a"),
        ("plms", "PLMS"),
        ("ddim", "DDIM"),
        ("unipc", "UniPC"),
        ("k_lcm", "LCM"),
    ],
)
def test_resolve_sampler_name_accepts_aliases(alias: str, expected: str) -> None:
    assert resolve_sampler_name(alias) == expected


@pytest.mark.parametrize("unknown", ["Euler b", "", "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++"])
def test_unknown_or_left_out_sampler_is_a_value_error_naming_the_field(unknown: str) -> None:
    with pytest.raises(UnknownSamplerError) as excinfo:
        resolve_sampler_name(unknown)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert "sampler_name" in message
    assert "Euler a" in message and "DPM++ 2M" in message
    with pytest.raises(UnknownSamplerError):
        build_scheduler(unknown, "Automatic", SD15_PNDM_CONFIG)


def test_unsupported_schedule_type_names_the_scheduler_field_and_choices() -> None:
    with pytest.raises(ValueError, match="scheduler") as excinfo:
        build_scheduler("Euler a", "Karras", SD15_PNDM_CONFIG)
    assert "Automatic, Uniform, SGM Uniform" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"scheduler.*Polyexponential"):
        build_scheduler("Euler", "Polyexponential", SD15_PNDM_CONFIG)
    with pytest.raises(ValueError, match="scheduler"):
        build_scheduler("LCM", "Uniform", SD15_PNDM_CONFIG)


def test_schedule_type_names_resolve_like_a1111() -> None:
    assert resolve_schedule_type("karras") == "Karras"
    assert resolve_schedule_type("KARRAS") == "Karras"
    assert resolve_schedule_type("sgm_uniform") == "SGM Uniform"
    assert resolve_schedule_type("SGMUniform") == "SGM Uniform"
    assert build_scheduler("Euler", "karras", SD15_PNDM_CONFIG).config.use_karras_sigmas is True


def test_alias_table_is_unambiguous() -> None:
    seen: dict[str, str] = {}
    for spec in SAMPLERS:
        for key in (spec.name, *spec.aliases, *spec.extra_aliases):
            folded = " ".join(key.split()).casefold()
            assert seen.setdefault(folded, spec.name) == spec.name, f"{key!r} maps to two samplers"


def test_schedule_types_per_sampler() -> None:
    assert schedule_types_for("Euler") == SCHEDULE_TYPES
    assert schedule_types_for("k_euler_a") == ("Automatic", "Uniform", "SGM Uniform")
    assert schedule_types_for("DPM++ 2S a") == ("Automatic", "Karras", "Exponential", "Beta")
    assert schedule_types_for("LCM") == ("Automatic",)
    for name in SAMPLER_NAMES:
        types = schedule_types_for(name)
        assert types[0] == "Automatic"
        assert set(types) <= set(SCHEDULE_TYPES)
        assert a1111_equivalent_schedule_type(name) in types
    assert a1111_equivalent_schedule_type("DPM++ 2M") == "Karras"
    assert a1111_equivalent_schedule_type("DPM++ 2M SDE") == "Exponential"
    assert a1111_equivalent_schedule_type("Euler") == "Uniform"


@pytest.mark.parametrize(
    ("legacy", "expected"),
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SGM Uniform", ("DPM++ 2M", "SGM Uniform")),
        ("Euler a", ("Euler a", None)),
        ("k_dpmpp_2m_ka", ("DPM++ 2M", "Karras")),
        ("k_dpm_2_a_ka", ("DPM2 a", "Karras")),
        ("k_dpmpp_2m_sde_ka", ("DPM++ 2M SDE", "Karras")),
        ("LMS Karras", ("LMS", "Karras")),
    ],
)
def test_split_legacy_sampler_name(legacy: str, expected: tuple[str, str | None]) -> None:
    assert split_legacy_sampler_name(legacy) == expected


def test_split_legacy_sampler_name_rejects_unknown() -> None:
    with pytest.raises(UnknownSamplerError, match="sampler_name"):
        split_legacy_sampler_name("Foo Karras")


def test_catalogues_have_a1111_response_shape() -> None:
    catalogue = sampler_catalogue()
    assert [item["name"] for item in catalogue] == list(SAMPLER_NAMES)
    for item in catalogue:
        assert set(item) == {"name", "aliases", "options"}
        assert all(isinstance(alias, str) for alias in item["aliases"])
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in item["options"].items())
    euler_a = next(item for item in catalogue if item["name"] == "Euler a")
    assert euler_a["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    dpmpp = next(item for item in catalogue if item["name"] == "DPM++ 2M")
    assert dpmpp["options"] == {"scheduler": "karras"}

    schedules = scheduler_catalogue()
    assert [item["label"] for item in schedules] == list(SCHEDULE_TYPES)
    for item in schedules:
        assert set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    karras = next(item for item in schedules if item["label"] == "Karras")
    assert karras == {
        "name": "karras",
        "label": "Karras",
        "aliases": None,
        "default_rho": 7.0,
        "need_inner_model": False,
    }
    sgm = next(item for item in schedules if item["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"]


def test_module_import_is_light() -> None:
    code = (
        "import sys, pipelines.generation.samplers, pipelines.outputs.infotext, pipelines.outputs.saving; "
        "heavy = [m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(samplers.__file__).resolve().parents[1])
