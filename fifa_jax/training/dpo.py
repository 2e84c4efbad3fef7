"""The Diffusion-DPO loss (Wallace et al. 2023; method.md §3 step 4-5).

For a micro-batch of B pairs, predictions are stacked winners first: rows 0..B-1 are the
winners, rows B..2B-1 their losers, each pair sharing noise and timestep. With per-sample
squared errors averaged over (C, H, W) in float32,

    se_pol = mean((policy_pred - target)^2),  se_ref = mean((ref_pred - target)^2)   (2B,)
    inside = -0.5 * beta * ((se_pol_w - se_pol_l) - (se_ref_w - se_ref_l))            (B,)
    loss   = mean(-log_sigmoid(inside))         (the mean of per-pair losses, not B1's
                                                 log-sigmoid of the mean)

beta conventions: this is the official (Salesforce) form, beta = 5000 in its launchers (2000
in the paper's SD1.5 run). diffusers' research script writes `beta_dpo * (ref_diff -
model_diff)` with beta_dpo = 2500, which is the same loss for beta_dpo = beta / 2.

Implicit accuracy: the share of pairs with inside > 0 (the policy prefers the winner more than
the reference does). A tie (inside == 0, e.g. at the first step, when policy == reference)
counts as 0.5, as diffusers counts it (Salesforce counts it as 0); `aux["implicit_acc_strict"]`
is the inside > 0 share.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fifa_jax.training.pref_loss import pair_losses


def squared_error(pred, target):
    """Per-sample mean squared error over every non-batch axis, float32: (N, ...) -> (N,)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def dpo_loss(policy_pred, ref_pred, target, beta: float, weights=None,
             interleaved: bool = False, loss: str = "dpo", beta_scale=None,
             sft_weight: float = 0.0, sft_scale=None):
    """Diffusion-DPO loss (or its IPO / hinge variant) on (2B, C, H, W) arrays, winners first.

    Args:
      policy_pred, ref_pred, target: (2B, C, H, W).
      beta: the official beta (e.g. 5000; diffusers' beta_dpo = beta / 2).
      weights: optional (B,) per-pair weights (1: counted, 0: padding); the mean is over
        the weighted pairs.
      interleaved: rows are (winner 0, loser 0, winner 1, ...) instead of winners first (the
        train step's layout: a device that holds a pair holds both its images).
      loss: "dpo" | "ipo" | "hinge" | "sft" (`train.loss`; formulas in pref_loss.py; "sft"
        is the winners' squared error, scaled by beta_scale, beta unused).
      beta_scale: optional (B,) per-pair beta scale s (SmPO weighting, pref_loss.smpo_scale);
        the loss uses beta * s, `inside` and the accuracies keep the unscaled beta.
      sft_weight: lambda >= 0 of the winners' anchor (`train.sft_weight`): each pair's loss
        gains lambda * u * se_pol_w (u: `sft_scale`, (B,), the pair's timestep weight; 1 when
        None). Not with loss "sft". The DPO loss pulls the winner's error down with
        weight beta / 4 at the start (sigmoid 1/2 of beta_dpo): lambda = beta / 4 doubles it.
    Returns:
      (loss scalar float32, aux) with aux: `inside`, `pair_loss`, `pair_acc` (B,) (each
      pair's beta * margin, loss and accuracy), `implicit_acc` (ties 0.5),
      `implicit_acc_strict`, `se_pol_w`, `se_pol_l`, `se_ref_w`, `se_ref_l` (batch means),
      `error_gap` (mean of (se_pol_w - se_pol_l) - (se_ref_w - se_ref_l): below 0 when the
      policy has learnt the preference).
    """
    n = policy_pred.shape[0]
    if n % 2 or ref_pred.shape != policy_pred.shape or target.shape != policy_pred.shape:
        raise ValueError(f"dpo_loss expects (2B, ...) arrays of one shape, winners first; got "
                         f"{policy_pred.shape}, {ref_pred.shape}, {target.shape}")
    b = n // 2
    se_pol = squared_error(policy_pred, target)
    se_ref = jax.lax.stop_gradient(squared_error(ref_pred, target))
    if interleaved:     # (2B,) errors, pairs adjacent -> winners first (2B scalars move)
        se_pol, se_ref = (x.reshape(b, 2).T.reshape(n) for x in (se_pol, se_ref))
    pol_diff = se_pol[:b] - se_pol[b:]
    ref_diff = se_ref[:b] - se_ref[b:]
    inside = -0.5 * beta * (pol_diff - ref_diff)
    if loss == "sft":
        per_pair = se_pol[:b] * (1.0 if beta_scale is None else beta_scale.astype(jnp.float32))
    else:
        per_pair = pair_losses(ref_diff - pol_diff, beta, loss, beta_scale)
    if sft_weight:
        if loss == "sft":
            raise ValueError("sft_weight adds the winners' error to a preference loss; "
                             "loss 'sft' is that error already")
        u = 1.0 if sft_scale is None else sft_scale.astype(jnp.float32)
        per_pair = per_pair + sft_weight * u * se_pol[:b]
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)

    def mean(x):
        return jnp.sum(w * x) / denom

    acc = jnp.where(inside > 0, 1.0, jnp.where(inside == 0, 0.5, 0.0))
    aux = {"inside": inside, "pair_loss": per_pair, "pair_acc": acc,
           "implicit_acc": mean(acc),
           "implicit_acc_strict": mean((inside > 0).astype(jnp.float32)),
           "se_pol_w": mean(se_pol[:b]), "se_pol_l": mean(se_pol[b:]),
           "se_ref_w": mean(se_ref[:b]), "se_ref_l": mean(se_ref[b:]),
           "error_gap": mean(pol_diff - ref_diff)}
    return mean(per_pair), aux
