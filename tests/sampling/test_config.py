"""Config resolution and the host-side grids vs diffusers (no JAX compile; fast).

from_config semantics (target-class defaults, ignored foreign keys, `_use_default_values`),
one-line errors naming unsupported keys, and the timesteps / σ / init_noise_sigma of
`set_timesteps` over many (sampler, spacing, N, config) cells.
"""
import inspect
import itertools

import diffusers
import numpy as np
import pytest

from fifa_jax.errors import InputError
from fifa_jax.sampling import (DIFFUSERS_CLASS, SAMPLERS, init_noise_sigma, plan_for, resolve,
                               timesteps)
from fifa_jax.sampling.config import DEFAULTS
from fifa_jax.sampling.schedules import alphas_cumprod, betas
from tests.sampling.reference import SD15


def scheduler(sampler, cfg, n):
    s = getattr(diffusers, DIFFUSERS_CLASS[sampler]).from_config(cfg)
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_defaults_are_diffusers_signature(sampler):
    sig = inspect.signature(getattr(diffusers, DIFFUSERS_CLASS[sampler]).__init__)
    assert DEFAULTS[sampler] == {k: p.default for k, p in sig.parameters.items() if k != "self"}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resolve_matches_from_config(sampler):
    cfg = dict(SD15, _use_default_values=["steps_offset"], timestep_spacing="trailing")
    ref = getattr(diffusers, DIFFUSERS_CLASS[sampler]).from_config(cfg).config
    ours = resolve(cfg, sampler)
    for key in DEFAULTS[sampler]:
        assert ours[key] == ref[key], key
    assert ours["steps_offset"] == 0          # dropped by _use_default_values
    assert "skip_prk_steps" in ours["_hidden"]


def test_sd15_reads_per_target_class():
    assert resolve(SD15, "ddim")["timestep_spacing"] == "leading"
    assert resolve(SD15, "euler")["timestep_spacing"] == "linspace"
    assert timesteps(SD15, "ddim", 50)[[0, -1]].tolist() == [981, 1]
    assert timesteps(SD15, "dpmpp_2m", 25)[[0, 1, -1]].tolist() == [999, 959, 40]


@pytest.mark.parametrize("sampler,key,value", [
    ("ddim", "thresholding", True), ("dpmpp_2m", "thresholding", True),
    ("euler", "interpolation_type", "log_linear"), ("euler", "timestep_type", "continuous"),
    ("euler", "use_beta_sigmas", True), ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
    ("dpmpp_2m", "use_lu_lambdas", True), ("dpmpp_2m", "use_flow_sigmas", True),
    ("dpmpp_2m", "variance_type", "learned_range"), ("dpmpp_2m", "solver_order", 4),
    ("dpmpp_2m", "use_dynamic_shifting", True), ("euler_a", "prediction_type", "sample"),
    ("euler", "prediction_type", "flow_prediction"), ("ddim", "timestep_spacing", "karras"),
    ("ddim", "beta_schedule", "sigmoid"), ("euler", "final_sigmas_type", "one"),
])
def test_unsupported_value_is_one_line_error_naming_key(sampler, key, value):
    with pytest.raises(InputError, match=f"scheduler_config key '{key}'") as e:
        resolve({key: value}, sampler)
    assert "\n" not in str(e.value)


def test_other_errors():
    with pytest.raises(InputError, match="sampler 'pndm'"):
        resolve({}, "pndm")
    with pytest.raises(InputError, match="use_karras_sigmas"):
        resolve({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "euler")
    with pytest.raises(InputError, match="eta"):
        plan_for({}, "euler", 10, eta=0.5)
    with pytest.raises(InputError, match="trained_betas"):
        resolve({"trained_betas": [0.1, 0.2]}, "ddim")


def test_keys_of_other_classes_are_ignored_like_diffusers():
    # DPM's solver_order means nothing to DDIM; diffusers ignores it, so do we.
    assert resolve({"solver_order": 5, "use_karras_sigmas": True}, "ddim")["timestep_spacing"]


@pytest.mark.parametrize("schedule,zero_snr", list(itertools.product(
    ["linear", "scaled_linear", "squaredcos_cap_v2"], [False, True])))
def test_betas_and_alphas(schedule, zero_snr):
    cfg = dict(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012,
               rescale_betas_zero_snr=zero_snr)
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    c = resolve(cfg, "euler")
    # The zero-SNR betas are 1 − ᾱ_t/ᾱ_{t−1}: torch's ≤ 2 ulp sqrt differences cancel there.
    np.testing.assert_allclose(betas(c), ref.betas.numpy(), rtol=2e-6,
                               atol=1e-5 if zero_snr else 1e-9)
    np.testing.assert_allclose(alphas_cumprod(c, clamp_terminal=True),
                               ref.alphas_cumprod.numpy(), rtol=2e-6 if not zero_snr else 2e-5,
                               atol=1e-9)


CELLS = list(itertools.product(SAMPLERS, ["leading", "linspace", "trailing"],
                               [1, 7, 10, 25, 50, 999], ["sd15", "defaults"]))


@pytest.mark.parametrize("sampler,spacing,n,base", CELLS)
def test_grids_match_set_timesteps(sampler, spacing, n, base):
    cfg = dict(SD15 if base == "sd15" else {}, timestep_spacing=spacing)
    ref = scheduler(sampler, cfg, n)
    np.testing.assert_array_equal(timesteps(cfg, sampler, n),
                                  ref.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(init_noise_sigma(cfg, sampler, n), float(ref.init_noise_sigma),
                               rtol=1e-6)
    plan = plan_for(cfg, sampler, n)
    if "sigma" in plan.tables:
        np.testing.assert_allclose(plan.tables["sigma"], ref.sigmas.numpy()[:-1], rtol=2e-6)
        np.testing.assert_allclose(plan.tables["in_div"],
                                   np.sqrt(ref.sigmas.numpy()[:-1] ** 2 + 1), rtol=2e-6)


@pytest.mark.parametrize("sampler,extra", [
    ("euler", dict(use_karras_sigmas=True)), ("euler", dict(use_exponential_sigmas=True)),
    ("dpmpp_2m", dict(use_karras_sigmas=True)), ("dpmpp_2m", dict(use_exponential_sigmas=True)),
    ("dpmpp_2m", dict(final_sigmas_type="sigma_min")),
])
@pytest.mark.parametrize("n", [10, 25, 50])
def test_custom_sigma_grids(sampler, extra, n):
    cfg = dict(SD15, **extra)
    ref = scheduler(sampler, cfg, n)
    ts = ref.timesteps.numpy().astype(np.float32)
    if sampler == "euler":   # fractional timesteps from float32 log σ: equal to rounding
        np.testing.assert_allclose(timesteps(cfg, sampler, n), ts, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(timesteps(cfg, sampler, n), ts)
