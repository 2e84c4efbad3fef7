"""Per-pair preference losses (`train.loss`) and SmPO margin weighting (`train.margin_weighting`).

Notation (per pair, float32, shapes (B,)): `logits = ref_diff - model_diff` with
`model_diff = se_pol_w - se_pol_l` and `ref_diff = se_ref_w - se_ref_l` (diffusers' research
script `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`, PR 6788, its
`logits`); `beta_dpo = beta / 2` (our `train.beta` is the official Salesforce beta, so
`inside = -0.5 * beta * (model_diff - ref_diff) = beta_dpo * logits`); `s` a per-pair beta
scale (1 without margin weighting), `b = beta_dpo * s`:

    dpo    loss = -log_sigmoid(b * logits)               (the script's `sigmoid` branch)
    hinge  loss = relu(1 - b * logits)                   (its `hinge` branch; its help text
                                                          calls it "cpo")
    ipo    loss = (logits - 1 / (2 * beta_dpo)) ** 2     (its `ipo` branch, which reads the
                                                          undefined `args.beta`: we read it as
                                                          beta_dpo, the script's only beta;
                                                          no per-pair scale: s must be 1)

    sft    loss = s * se_pol_w                           (not a preference loss: supervised
                                                          fine-tuning on the winners alone,
                                                          the epsilon MSE of the base's
                                                          pretraining; the reference point of
                                                          what the winners' images teach;
                                                          beta unused; `dpo_loss` takes it)

each averaged over the pairs by the caller. With s = 1, `dpo` is today's loss bit for bit.

The winners' anchor (`train.sft_weight` = lambda, 0 by default and in the paper's recipes):
each pair's loss of dpo / hinge / ipo gains lambda * u * se_pol_w, u the pair's timestep
weight (1 without `train.timestep_weighting`), in training only. Why (#24, the demo): the
DPO loss can be lowered by raising both errors, the loser's more, and it does: after 100
demo steps the policy's winner error is above the reference's (4% at lr 1e-5, 83% at
1e-4), the model denoises its own preferred images worse. The anchor is the diffusion
form of RPO's negative log-likelihood term on the chosen response (Pang et al. 2024).

SmPO margin weighting (Lu et al., "Smoothed Preference Optimization via ReNoise Inversion",
ICML 2025; read from the public JaydenLyh/SmPO `train.py` and `preprocessing.py`, 2025-06):
SmPO scores both images with PickScore's raw cosine c (no logit scale), min-max normalises
each with fixed constants, c' = (c - 0.11544) / (0.28202 - 0.11544), and takes the preference
probability p = exp(c'_w) / (exp(c'_w) + exp(c'_l)); its loss is the DPO loss with
`inside = -0.5 * beta * (2p - 1) * 10 * (model_diff - ref_diff)`. Our score stage's margin is
m = score_w - score_l with score = exp(logit_scale) * cos = 100 * cos for PickScore, so

    p = sigmoid(m / T),  T = 100 * (0.28202 - 0.11544) = 16.658     (`train.smpo_temperature`)
    s = gain * (2p - 1),  gain = 10                                 (`train.smpo_gain`)

The min-max offset cancels in p (only the difference enters). Uncertain / ours: SmPO's
`train.py` reads `batch['probs'][0]`, the first pair's p, for its whole micro-batch (its
launchers use one pair per micro-batch, where that is the same); we scale every pair by its
own p. SmPO orders pairs by the PickScore winner, so p >= 0.5; without `select.relabel` a pair
the proxy disagrees with has p < 0.5 and s < 0, which for `dpo` equals training the relabelled
pair with |s| (-log_sigmoid(-x) is the flipped pair's loss). Other proxies than PickScore need
their own temperature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOSSES = ("dpo", "ipo", "hinge", "sft")
MARGIN_WEIGHTINGS = ("none", "smpo")
SMPO_TEMPERATURE = 100.0 * (0.28201571106910706 - 0.11543526500463486)
SMPO_GAIN = 10.0


def pair_losses(logits, beta: float, kind: str = "dpo", scale=None):
    """(B,) per-pair losses from (B,) logits = ref_diff - model_diff (formulas above).

    beta: the official beta (beta_dpo = beta / 2); scale: optional (B,) per-pair beta scale s.
    """
    b = 0.5 * beta if scale is None else 0.5 * beta * scale.astype(jnp.float32)
    if kind == "dpo":
        return -jax.nn.log_sigmoid(b * logits)
    if kind == "hinge":
        return jax.nn.relu(1.0 - b * logits)
    if kind == "ipo":
        if scale is not None:
            raise ValueError("train.loss='ipo' takes no per-pair beta scale (its target "
                             "1 / (2 beta) diverges at s = 0): use train.margin_weighting='none'")
        return jnp.square(logits - 1.0 / (2.0 * (0.5 * beta)))
    if kind == "sft":
        raise ValueError("train.loss='sft' is not a function of the logits: dpo_loss computes "
                         "it from the winners' errors")
    raise ValueError(f"config key 'train.loss' must be one of {LOSSES}, got {kind!r}")


def proxy_probability(margin, temperature: float = SMPO_TEMPERATURE):
    """p = sigmoid(m / T): the proxy's probability that the trained winner is preferred; m the
    signed proxy-score margin (trained winner minus loser), any shape, numpy or jax."""
    xp = jnp if isinstance(margin, jax.Array) else np
    m = xp.asarray(margin, xp.float32) / xp.float32(temperature)
    return 1.0 / (1.0 + xp.exp(-m))


def smpo_scale(prob, gain: float = SMPO_GAIN):
    """s = gain * (2p - 1): SmPO's per-pair beta scale from the proxy probability p."""
    return gain * (2.0 * prob.astype(jnp.float32) - 1.0)


def check_config(tc) -> None:
    """train.loss / margin_weighting / smpo_* checks: one-line errors naming the key."""
    from fifa_jax.config_check import ConfigError
    loss = tc.get("loss", "dpo")
    mw = tc.get("margin_weighting", "none")
    if loss not in LOSSES:
        raise ConfigError(f"config key 'train.loss' must be one of {LOSSES}; got {loss!r}")
    if mw not in MARGIN_WEIGHTINGS:
        raise ConfigError(f"config key 'train.margin_weighting' must be one of "
                          f"{MARGIN_WEIGHTINGS}; got {mw!r}")
    if mw == "smpo" and loss == "sft":
        raise ConfigError("config key 'train.margin_weighting' = 'smpo' weights preference "
                          "pairs; train.loss = 'sft' trains on the winners alone (use 'none')")
    if mw == "smpo" and loss == "ipo":
        raise ConfigError("config key 'train.margin_weighting' = 'smpo' scales beta per pair, "
                          "which train.loss = 'ipo' cannot take (use 'dpo' or 'hinge')")
    from fifa_jax.training.timestep_weighting import WEIGHTINGS
    tw = tc.get("timestep_weighting", "none")
    if tw not in WEIGHTINGS:
        raise ConfigError(f"config key 'train.timestep_weighting' must be one of {WEIGHTINGS}; "
                          f"got {tw!r}")
    if tw != "none" and loss == "ipo":
        raise ConfigError("config key 'train.timestep_weighting' scales beta per pair, which "
                          "train.loss = 'ipo' cannot take (use 'dpo' or 'hinge')")
    lo, hi = int(tc.get("min_timestep", 0)), int(tc.get("max_timestep", -1))
    if lo < 0 or (hi != -1 and hi < lo):
        raise ConfigError(f"config keys 'train.min_timestep' / 'train.max_timestep' must give "
                          f"0 <= min <= max (max -1: the last timestep); got {lo} / {hi}")
    sft_weight = float(tc.get("sft_weight", 0.0))
    if sft_weight < 0 or not np.isfinite(sft_weight):
        raise ConfigError(f"config key 'train.sft_weight' must be a finite number >= 0; got "
                          f"{tc.sft_weight}")
    if sft_weight > 0 and loss == "sft":
        raise ConfigError("config key 'train.sft_weight' adds the winners' error to a "
                          "preference loss; train.loss = 'sft' is that error alone (set it to 0)")
    if not float(tc.get("snr_gamma", 5.0)) > 0:
        raise ConfigError(f"config key 'train.snr_gamma' must be > 0; got {tc.snr_gamma}")
    if not float(tc.get("smpo_temperature", SMPO_TEMPERATURE)) > 0:
        raise ConfigError(f"config key 'train.smpo_temperature' must be > 0; got "
                          f"{tc.smpo_temperature}")


__all__ = ["LOSSES", "MARGIN_WEIGHTINGS", "SMPO_TEMPERATURE", "SMPO_GAIN", "pair_losses",
           "proxy_probability", "smpo_scale", "check_config"]
