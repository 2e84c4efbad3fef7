"""Whole guided loops vs diffusers' schedulers (torch, CPU) on a smooth stand-in model.

Each case: the same noise and conditioning, diffusers' `XScheduler.from_config(cfg)` driven as
StableDiffusionPipeline drives it, vs our `run_plan` on the plan `denoise` builds. Timesteps
must be equal; final latents max abs diff < 1e-4 (float32). Euler-A gets our per-step noise
through a patched `randn_tensor`; DDIM with eta > 0 through `variance_noise`.
One jitted `run_plan` is shared: configs with the same sampler / prediction type / N reuse it.
"""
import itertools

import jax
import numpy as np
import pytest

from fifa_jax.sampling import SAMPLERS, plan_for, run_plan, timesteps
from tests.sampling.reference import SD15, diffusers_loop, jax_model, make_inputs

TOL = 1e-4
KEY = jax.random.key(7)
RUN = jax.jit(run_plan, static_argnums=0, static_argnames=("guidance_scale", "guidance_rescale"))


def check(sampler, cfg, n, monkeypatch, *, guidance_scale=7.5, guidance_rescale=0.0, eta=0.0,
          pytree=False, exact_timesteps=True):
    noise, cond, uncond = make_inputs(pytree=pytree)
    ref, ref_ts = diffusers_loop(sampler, cfg, n, noise, cond, uncond,
                                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                 eta=eta, key=KEY, monkeypatch=monkeypatch)
    plan = plan_for(cfg, sampler, n, eta)
    ours = np.asarray(RUN(jax_model, plan, noise, cond, uncond, guidance_scale=guidance_scale,
                          guidance_rescale=guidance_rescale, key=KEY))
    ts = timesteps(cfg, sampler, n)
    if exact_timesteps:
        np.testing.assert_array_equal(ts, ref_ts)
    else:
        np.testing.assert_allclose(ts, ref_ts, rtol=0, atol=1e-3)
    assert np.all(np.isfinite(ref))
    err = np.abs(ours - ref).max()
    assert err < TOL, f"max abs diff {err:.3g} (latents scale {np.abs(ref).max():.3g})"
    return ours


GRID = list(itertools.product(SAMPLERS, ["leading", "linspace", "trailing"],
                              ["epsilon", "v_prediction"], ["sd15", "defaults"]))


@pytest.mark.parametrize("sampler,spacing,prediction,base", GRID)
def test_grid_10_steps(sampler, spacing, prediction, base, monkeypatch):
    cfg = dict(SD15 if base == "sd15" else {}, timestep_spacing=spacing,
               prediction_type=prediction)
    check(sampler, cfg, 10, monkeypatch)


@pytest.mark.parametrize("sampler,spacing", list(itertools.product(
    SAMPLERS, ["leading", "linspace", "trailing"])))
def test_sd15_25_steps(sampler, spacing, monkeypatch):
    check(sampler, dict(SD15, timestep_spacing=spacing), 25, monkeypatch)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sd15_config_as_is(sampler, monkeypatch):
    """The PNDM config unchanged: DDIM reads it as leading+1, the others as linspace."""
    check(sampler, SD15, 10, monkeypatch)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_snr_v_prediction(sampler, monkeypatch):
    """SD2.1-v-like with zero terminal SNR + trailing (σ_max clamped via ᾱ_T = 2^-24)."""
    cfg = dict(SD15, prediction_type="v_prediction", rescale_betas_zero_snr=True,
               timestep_spacing="trailing")
    check(sampler, cfg, 10, monkeypatch)


EXTRA = {
    "dpm_karras": ("dpmpp_2m", dict(SD15, use_karras_sigmas=True), 10, True),
    "dpm_karras_sigma_from_hidden_key": (
        "dpmpp_2m", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 10, True),
    "dpm_exponential": ("dpmpp_2m", dict(SD15, use_exponential_sigmas=True), 10, True),
    "dpm_sigma_min_final": ("dpmpp_2m", dict(SD15, final_sigmas_type="sigma_min"), 10, True),
    "dpm_sigma_min_final_20": ("dpmpp_2m", dict(SD15, final_sigmas_type="sigma_min",
                                                lower_order_final=False), 20, True),
    "dpm_heun": ("dpmpp_2m", dict(SD15, solver_type="heun"), 10, True),
    "dpm_order3": ("dpmpp_2m", dict(SD15, solver_order=3, final_sigmas_type="sigma_min"),
                   20, True),
    "dpm_order1": ("dpmpp_2m", dict(SD15, solver_order=1), 10, True),
    "dpm_euler_at_final": ("dpmpp_2m", dict(SD15, euler_at_final=True,
                                            final_sigmas_type="sigma_min"), 20, True),
    "dpm_lambda_clipped": ("dpmpp_2m", dict(beta_schedule="squaredcos_cap_v2",
                                            lambda_min_clipped=-5.1), 10, True),
    "euler_karras": ("euler", dict(SD15, use_karras_sigmas=True), 10, False),
    "euler_sigma_min_final": ("euler", dict(SD15, final_sigmas_type="sigma_min"), 10, True),
    "euler_sample_pred": ("euler", dict(SD15, prediction_type="sample"), 10, True),
    "ddim_sample_pred_clip": ("ddim", dict(SD15, prediction_type="sample", clip_sample=True,
                                           clip_sample_range=0.8), 10, True),
    "ddim_trained_betas": ("ddim", dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist(),
                                        clip_sample=False), 10, True),
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_config_options(name, monkeypatch):
    sampler, cfg, n, exact = EXTRA[name]
    check(sampler, cfg, n, monkeypatch, exact_timesteps=exact)


def test_ddim_eta(monkeypatch):
    check("ddim", SD15, 10, monkeypatch, eta=0.6)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_guidance_rescale_and_pytree_context(sampler, monkeypatch):
    check(sampler, dict(SD15, timestep_spacing="trailing"), 10, monkeypatch,
          guidance_rescale=0.7, pytree=True)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_no_guidance(sampler, monkeypatch):
    check(sampler, SD15, 10, monkeypatch, guidance_scale=1.0)
