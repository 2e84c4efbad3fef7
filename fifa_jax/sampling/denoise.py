"""The guided sampling loop: `denoise` (pure, jit-friendly) and `make_denoise` (jitted).

One step i, as `StableDiffusionPipeline.__call__` (diffusers 0.42.1) does it:
  x_in = x / in_div_i                                 (scheduler.scale_model_input)
  CFG on (guidance_scale > 1):
      pred = model_fn([x_in; x_in], t_i, [uncond; cond])   context concatenated on axis 0,
      ε_u, ε_c = pred[:B], pred[B:]                          ordered [uncond, cond]
      ε = ε_u + s·(ε_c − ε_u)
      guidance_rescale φ > 0:  ε ← φ·ε·std(ε_c)/std(ε) + (1 − φ)·ε,
          std over all non-batch axes, unbiased (ddof=1) as torch's
  CFG off: ε = model_fn(x_in, t_i, cond)  (`uncond` unused, may be None)
  x = sampler step (samplers.py)
The loop is one `lax.scan` over the per-step tables (host NumPy, computed before tracing);
the start is x = noise · init_noise_sigma. Everything is elementwise in the batch except the
model, so a batch sharded over a mesh stays sharded (`jax.jit` propagates the input sharding).

Randomness (Euler-A, DDIM with eta > 0): the noise of step i is `step_noise(key, i, shape)`
= N(0, 1) from `fold_in(key, i)`, of the whole batch's shape (so a sample's noise depends on
the batch size B, not on the sharding).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fifa_jax.errors import InputError
from fifa_jax.sampling.config import resolve
from fifa_jax.sampling.samplers import STEPS, Plan, make_plan

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def step_noise(key: jax.Array, step_index, shape) -> jax.Array:
    """The N(0, 1) float32 noise the stochastic samplers add at step `step_index` (0-based)."""
    return jax.random.normal(jax.random.fold_in(key, step_index), shape, jnp.float32)


def rescale_noise_cfg(guided: jax.Array, cond_pred: jax.Array, phi: float) -> jax.Array:
    """φ·guided·std(cond_pred)/std(guided) + (1−φ)·guided; std per sample over axes 1.., ddof=1."""
    axes = tuple(range(1, guided.ndim))
    ratio = (jnp.std(cond_pred, axis=axes, keepdims=True, ddof=1)
             / jnp.std(guided, axis=axes, keepdims=True, ddof=1))
    return phi * (guided * ratio) + (1 - phi) * guided


def plan_for(scheduler_config: dict | None, sampler: str, num_steps: int,
             eta: float = 0.0) -> Plan:
    """The host-side `Plan` (per-step tables) for a diffusers scheduler config."""
    return make_plan(resolve(scheduler_config, sampler), sampler, num_steps, eta)


def timesteps(scheduler_config: dict | None, sampler: str, num_steps: int) -> np.ndarray:
    """The model-facing timesteps (N,) float32, equal to diffusers' `scheduler.timesteps`
    (integers for ddim / dpmpp_2m, fractional for euler / euler_a with linspace)."""
    return np.asarray(plan_for(scheduler_config, sampler, num_steps).tables["t"])


def init_noise_sigma(scheduler_config: dict | None, sampler: str, num_steps: int) -> float:
    """diffusers' `scheduler.init_noise_sigma` after `set_timesteps(num_steps)`: 1 for DDIM and
    DPM-Solver; σ_max (linspace / trailing) or √(σ_max² + 1) (leading) for Euler(-A)."""
    return float(plan_for(scheduler_config, sampler, num_steps).init_noise_sigma)


def run_plan(model_fn: ModelFn, plan: Plan, noise: jax.Array, cond: Any, uncond: Any = None, *,
             guidance_scale: float, guidance_rescale: float = 0.0,
             key: jax.Array | None = None) -> jax.Array:
    """The loop for a prepared `Plan` (a pytree: jit it with the plan as an argument to share
    one compile across configs with the same sampler / prediction type / N). Args as `denoise`."""
    cfg = float(guidance_scale) > 1.0
    if cfg and uncond is None:
        raise InputError(f"guidance_scale={guidance_scale} > 1 needs `uncond`")
    if plan.stochastic and key is None:
        raise InputError(f"the {plan.sampler!r} sampler{' with eta > 0' * (plan.sampler == 'ddim')}"
                         " needs a PRNG `key`")
    b = noise.shape[0]
    context = (jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
               if cfg else cond)
    step = STEPS[plan.sampler]

    def predict(x_in, t):
        if not cfg:
            return model_fn(x_in, jnp.full((b,), t, jnp.float32), context).astype(jnp.float32)
        pred = model_fn(jnp.concatenate([x_in, x_in], axis=0),
                        jnp.full((2 * b,), t, jnp.float32), context).astype(jnp.float32)
        pred_u, pred_c = pred[:b], pred[b:]
        guided = pred_u + guidance_scale * (pred_c - pred_u)
        if guidance_rescale > 0:
            guided = rescale_noise_cfg(guided, pred_c, guidance_rescale)
        return guided

    def body(carry, row):
        x, hist = carry
        out = predict(x / row["in_div"], row["t"])
        z = step_noise(key, row["i"], x.shape) if plan.stochastic else None
        return step(plan, row, x, out, hist, z), None

    x = jnp.asarray(noise, jnp.float32) * jnp.asarray(plan.init_noise_sigma, jnp.float32)
    hist = tuple(jnp.zeros_like(x) for _ in range(plan.history))
    rows = dict(plan.tables, i=np.arange(plan.num_steps, dtype=np.int32))
    (x, _), _ = jax.lax.scan(body, (x, hist), rows)
    return x


def denoise(model_fn: ModelFn, noise: jax.Array, cond: Any, uncond: Any = None, *,
            scheduler_config: dict | None, sampler: str, num_steps: int,
            guidance_scale: float, key: jax.Array | None = None,
            guidance_rescale: float = 0.0, eta: float = 0.0) -> jax.Array:
    """Sample latents with classifier-free guidance, as diffusers' SD / SDXL pipelines do.

    model_fn(latents (B', C, H, W) float32, timesteps (B',) float32, context) -> prediction
      (B', C, H, W) (ε or v per the config's prediction_type); B' = 2B with CFG, else B.
    noise: (B, C, H, W) unit Gaussian; scaled inside by init_noise_sigma.
    cond / uncond: the text conditioning, an array (B, L, D) or any pytree of (B, ...) arrays
      (SDXL: {"encoder_hidden_states": (B, L, D), "text_embeds": (B, P), "time_ids": (B, 6)}).
      With CFG the context given to model_fn is the pytree of `concatenate([uncond, cond], 0)`
      (uncond first, like diffusers); without CFG it is `cond`.
    scheduler_config: a diffusers scheduler_config.json dict, read as
      `<target class>.from_config(cfg)` would (config.py); sampler: ddim | euler | euler_a |
      dpmpp_2m. guidance_scale: a Python number, CFG iff > 1. guidance_rescale: φ (0 = off).
    key: PRNG key, needed by euler_a and by ddim with eta > 0 (`step_noise`).
    Returns the final latents (B, C, H, W) float32 (not divided by the VAE scaling factor).

    jit: the config, sampler, num_steps, guidance values and model_fn are static, e.g.
      f = jax.jit(functools.partial(denoise, model_fn, scheduler_config=cfg, sampler="ddim",
                                    num_steps=50, guidance_scale=7.5))
    but closing over model weights makes them constants; pass them as an argument instead
    with `make_denoise`.
    """
    plan = plan_for(scheduler_config, sampler, num_steps, eta)
    return run_plan(model_fn, plan, noise, cond, uncond, guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale, key=key)


def make_denoise(model_fn: Callable[..., jax.Array], *, scheduler_config: dict | None,
                 sampler: str, num_steps: int, guidance_scale: float,
                 guidance_rescale: float = 0.0, eta: float = 0.0) -> Callable[..., jax.Array]:
    """`jax.jit`ted f(params, noise, cond, uncond=None, key=None) -> latents, with
    model_fn(params, latents, timesteps, context) -> prediction; the weights stay arguments
    (not baked-in constants), so the same compile serves new params and sharded inputs.
    E.g. with an nnx UNet: graphdef, state = nnx.split(unet);
      model_fn = lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c)."""
    plan = plan_for(scheduler_config, sampler, num_steps, eta)

    def run(params, noise, cond, uncond=None, key=None):
        return run_plan(lambda x, t, c: model_fn(params, x, t, c), plan, noise, cond, uncond,
                        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                        key=key)
    return jax.jit(run)
