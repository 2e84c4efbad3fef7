"""The DDPM forward process of the base model, read from its `scheduler_config.json`.

    betas           (T,)  from beta_schedule: linear | scaled_linear | squaredcos_cap_v2
                          (or trained_betas), float32 as diffusers computes them
    alphas_cumprod  (T,)  abar_t = prod_{s<=t} (1 - beta_s)
    x_t    = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                  (`add_noise`)
    target = eps (epsilon) | sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (v_prediction)

Training draws t ~ U{0..T-1} (diffusers `DDPMScheduler.add_noise` / `get_velocity`); the
tables are built in numpy once, outside any trace. Keys diffusers honours for training that we
do not implement (e.g. `rescale_betas_zero_snr`, sample prediction) are refused by name.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from fifa_jax.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep tables (T,) float32 and the prediction type."""
    alphas_cumprod: np.ndarray
    prediction_type: str

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def _betas(cfg: Mapping, source: str) -> np.ndarray:
    t = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], np.float32)
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(b0, b1, t, dtype=np.float32)
    if kind == "scaled_linear":
        return np.linspace(b0 ** 0.5, b1 ** 0.5, t, dtype=np.float32) ** 2
    if kind == "squaredcos_cap_v2":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.asarray([min(1 - abar((i + 1) / t) / abar(i / t), 0.999) for i in range(t)],
                          np.float32)
    raise InputError(f"{source}: beta_schedule {kind!r} is not supported for training; "
                     f"expected linear, scaled_linear or squaredcos_cap_v2")


def from_scheduler_config(cfg: Mapping, source: str = "scheduler_config.json",
                          prediction_type: str | None = None) -> NoiseSchedule:
    """The training schedule of a diffusers scheduler config (any scheduler class: SD ships
    PNDM / DDIM / Euler configs that share these keys). `prediction_type` overrides the
    config's (None: the config's, default epsilon)."""
    if cfg.get("rescale_betas_zero_snr"):
        raise InputError(f"{source}: rescale_betas_zero_snr=true is not supported by the "
                         f"trainer")
    pred = prediction_type or cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise InputError(f"{source}: prediction_type {pred!r} is not supported; expected one "
                         f"of {', '.join(PREDICTION_TYPES)}")
    betas = _betas(cfg, source)
    abar = np.cumprod(1.0 - betas, axis=0, dtype=np.float32)
    return NoiseSchedule(alphas_cumprod=abar.astype(np.float32), prediction_type=pred)


def _gather(table: np.ndarray, t, ndim: int):
    v = jnp.asarray(table)[t]
    return v.reshape(v.shape + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, x0, noise, t):
    """x_t (B, C, H, W) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (B,) int32."""
    abar = _gather(schedule.alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def target(schedule: NoiseSchedule, x0, noise, t):
    """The regression target (B, C, H, W): noise (epsilon) or the velocity (v_prediction)."""
    if schedule.prediction_type == "epsilon":
        return noise
    abar = _gather(schedule.alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
