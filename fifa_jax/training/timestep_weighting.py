"""Per-timestep weights of the DPO loss (`train.timestep_weighting`), off by default (the
same weights scale the `sft` loss of the winners alone: pref_loss.py).

Diffusion-DPO draws one timestep t ~ U{0..T-1} a pair and weights every t alike, as the plain
epsilon-MSE loss does. With SNR_t = abar_t / (1 - abar_t) (abar: the schedule's
`alphas_cumprod`), a pair's beta is scaled by w(t) (inside the sigmoid, as SmPO's scale is):

    none         w = 1                                    (Diffusion-DPO; the paper's recipes)
    min_snr      w = min(SNR_t, gamma) / SNR_t            epsilon prediction
                 w = min(SNR_t, gamma) / (SNR_t + 1)      v prediction
                 (Min-SNR-gamma, Hang et al., ICCV 2023, eq. of its section 3.4 / diffusers'
                  `snr_gamma` option; gamma = `train.snr_gamma`, 5 there: it lowers the weight
                  of the low-noise steps, where SNR > gamma)
    inverse_snr  w = max(1, 1 / SNR_t)                    (raises the high-noise steps, where
                                                            only the prompt tells the content:
                                                            the demo base's pretraining weight,
                                                            demo/train_unet.py)

    weights(kind, alphas_cumprod, t, gamma, prediction_type) -> (B,) float32 or None (none)
"""
from __future__ import annotations

import jax.numpy as jnp

WEIGHTINGS = ("none", "min_snr", "inverse_snr")


def snr(alphas_cumprod, t):
    """SNR_t = abar_t / (1 - abar_t) for integer timesteps t (any shape)."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return abar / (1.0 - abar)


def weights(kind: str, alphas_cumprod, t, gamma: float = 5.0,
            prediction_type: str = "epsilon"):
    """(B,) w(t) for the pairs' timesteps t (B,) int; None for "none" (formulas above)."""
    if kind == "none":
        return None
    s = snr(alphas_cumprod, t)
    if kind == "min_snr":
        clipped = jnp.minimum(s, jnp.float32(gamma))
        return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s
    if kind == "inverse_snr":
        return jnp.maximum(1.0, 1.0 / s)
    raise ValueError(f"config key 'train.timestep_weighting' must be one of {WEIGHTINGS}; "
                     f"got {kind!r}")
