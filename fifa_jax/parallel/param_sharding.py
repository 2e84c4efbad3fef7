"""Sharding of model parameters: a (regex, tactic) rule table -> NamedSharding per param.

Tactics:
  "replicate": every parameter is whole on every device (P()).
  "fsdp":      each parameter matched by an "fsdp" rule is split over the mesh axis "fsdp"
               along its largest dimension divisible by that axis' size (ties: the later
               dimension); parameters with no such dimension, smaller than `min_size`
               elements, or matched by a "replicate" rule stay replicated. Over "data" every
               parameter is replicated.

Rules see the parameter's dotted nnx path, e.g. `down_blocks.0.resnets.1.conv1.kernel`; the
first matching rule decides. The model code carries no sharding annotations.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TACTICS = ("replicate", "fsdp")
FSDP_AXIS = "fsdp"
# Norm scales and all biases are small vectors: replicate; shard every other tensor.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(bias|scale)$", "replicate"),
    (r".*", "fsdp"),
)


def _key_str(k) -> str | None:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            v = getattr(k, attr)
            return None if (attr == "name" and v == "value") else str(v)
    return str(k)


def path_str(keypath) -> str:
    """Dotted parameter path from a jax key path (nnx State: dict keys, then `.value`)."""
    return ".".join(s for s in (_key_str(k) for k in keypath) if s is not None)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 0) -> P:
    """P with "fsdp" on the largest dim of `shape` divisible by `fsdp_size` (or P())."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp_size == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    return P(*([None] * best + [FSDP_AXIS]))


def partition_spec(path: str, shape: Sequence[int], *, tactic: str, fsdp_size: int,
                   rules: Sequence[tuple[str, str]] = DEFAULT_RULES, min_size: int = 0) -> P:
    """PartitionSpec of one parameter under `tactic` and the first rule matching `path`."""
    if tactic not in TACTICS:
        raise ValueError(f"sharding tactic must be one of {TACTICS}, got {tactic!r}")
    if tactic == "replicate":
        return P()
    for pattern, rule_tactic in rules:
        if re.search(pattern, path):
            if rule_tactic not in TACTICS:
                raise ValueError(f"rule {pattern!r}: tactic must be one of {TACTICS}, "
                                 f"got {rule_tactic!r}")
            if rule_tactic == "replicate":
                return P()
            return fsdp_spec(shape, fsdp_size, min_size)
    return P()


def param_shardings(state, mesh: Mesh, *, tactic: str = "fsdp",
                    rules: Sequence[tuple[str, str]] = DEFAULT_RULES, min_size: int = 2 ** 14):
    """A pytree like `state` (an nnx State, or any pytree of arrays / ShapeDtypeStructs) with
    a NamedSharding on `mesh` (axes include "fsdp") for every leaf."""
    if FSDP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} lack {FSDP_AXIS!r}")
    size = mesh.shape[FSDP_AXIS]

    def one(keypath, leaf):
        spec = partition_spec(path_str(keypath), np.shape(leaf), tactic=tactic,
                              fsdp_size=size, rules=rules, min_size=min_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def describe(shardings) -> dict[str, str]:
    """path -> str(PartitionSpec), for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_str(k): str(s.spec) for k, s in flat}


def shard_state(state, mesh: Mesh, **kwargs):
    """`state` placed on `mesh` by `param_shardings(state, mesh, **kwargs)`."""
    return jax.device_put(state, param_shardings(state, mesh, **kwargs))
