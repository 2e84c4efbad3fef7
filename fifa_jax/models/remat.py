"""Gradient checkpointing (remat) policies selectable by name from a config."""
from __future__ import annotations

import jax
from flax import nnx

POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
            "dots_with_no_batch_dims_saveable")


def resolve_policy(name: str | None):
    """None / "none" -> no remat; otherwise the jax.checkpoint_policies entry `name`."""
    if name is None or name == "none":
        return None
    if name not in POLICIES:
        raise ValueError(f"remat policy must be None, 'none' or one of {POLICIES}, got {name!r}")
    return getattr(jax.checkpoint_policies, name)


def maybe_remat(fn, policy_name: str | None):
    """`fn(module, *args)` wrapped in nnx.remat with the named policy (or unchanged)."""
    policy = resolve_policy(policy_name)
    if policy is None:
        return fn
    return nnx.remat(fn, policy=policy)
