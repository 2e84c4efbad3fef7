"""Diffusion-DPO training: encode, train, checkpoints, export.

Public: `dpo_loss(policy_pred, ref_pred, target, beta)` on (2B, C, H, W) arrays, winners first
(training/dpo.py). The stages (`encode`, `train`, `export`) are imported on demand.
"""
from fifa_jax.training.dpo import dpo_loss, squared_error

__all__ = ["dpo_loss", "squared_error"]
