"""Sharding of model parameters: a (regex, tactic) rule table -> NamedSharding per param.

This is the one place that decides how parameters are laid out over devices: the diffusers
loaders (`unet_io`, `vae_io`, `clip_io`, `pipeline`), the LM loader (`llm_io`) and the trainer
all ask it.

Tactics:
  "replicate": every parameter is whole on every device (P()).
  "fsdp":      each parameter matched by an "fsdp" rule is split over the mesh axis "fsdp"
               along its largest dimension divisible by that axis' size (ties: the later
               dimension, i.e. output features / channels of a square kernel); 0-d and 1-d
               parameters, parameters with no such dimension, smaller than `min_size`
               elements, or matched by a "replicate" rule stay replicated. Over "data" every
               parameter is replicated. Specs name every dimension: P("fsdp", None), never
               the trimmed P("fsdp") (the two compare unequal).

Rules see the parameter's dotted nnx path, e.g. `down_blocks.0.resnets.1.conv1.kernel`; the
first matching rule (`re.search`) decides; a parameter no rule matches is replicated. The model
code carries no sharding annotations.

Config (`config.mesh`, see `mesh.default_config`): `param_tactic` ("fsdp" | "replicate" |
"zero") and `rules`, a tuple of (regex, tactic) pairs; `param_shardings_from_config` applies
them. "zero" (ZeRO stage 2) replicates every model's parameters and splits only the trainer's
optimiser state and gradient accumulator by the rules (`state_rules_from_config`): the forward
and backward gather no weight; each micro-batch's gradients are reduced (XLA picks all-reduce
or reduce-scatter) into the accumulator's shard, the updated parameters all-gathered once a
step.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.errors import InputError

TACTICS = ("replicate", "fsdp")                 # what a rule may say of a parameter
PARAM_TACTICS = ("fsdp", "replicate", "zero")   # mesh.param_tactic
FSDP_AXIS = "fsdp"
# Norm scales and all biases are small vectors: replicate; shard every other tensor.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(bias|scale)$", "replicate"),
    (r".*", "fsdp"),
)
REPLICATE_ALL: tuple[tuple[str, str], ...] = ((r".*", "replicate"),)


class ShardingRulesError(InputError):
    """A sharding rule table is malformed (one line naming the rule and where it came from)."""


def check_rules(rules, where: str = "rules") -> tuple[tuple[str, str], ...]:
    """`rules` as a tuple of (regex, tactic) pairs; raise ShardingRulesError naming `where`
    when one is not a pair, its regex does not compile, or its tactic is unknown."""
    if isinstance(rules, (str, bytes)) or not hasattr(rules, "__iter__"):
        raise ShardingRulesError(f"{where} must be a sequence of (regex, tactic) pairs, "
                                 f"got {rules!r}")
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, (str, bytes)) or not hasattr(rule, "__len__") or len(rule) != 2:
            raise ShardingRulesError(f"{where}[{i}] must be a (regex, tactic) pair, "
                                     f"got {rule!r}")
        pattern, tactic = rule
        if not isinstance(pattern, str):
            raise ShardingRulesError(f"{where}[{i}]: regex must be a string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ShardingRulesError(f"{where}[{i}]: bad regex {pattern!r}: {e}") from None
        if tactic not in TACTICS:
            raise ShardingRulesError(f"{where}[{i}] ({pattern!r}): tactic must be one of "
                                     f"{TACTICS}, got {tactic!r}")
        out.append((pattern, tactic))
    return tuple(out)


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
    """P with "fsdp" on the largest dim of `shape` divisible by `fsdp_size` (ties: the later
    one), None on the others; P() for fsdp_size 1, fewer than 2 dims, fewer than `min_size`
    elements or no divisible dim."""
    shape = tuple(int(d) for d in shape)
    if (fsdp_size <= 1 or len(shape) < 2
            or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1)):
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp_size == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = FSDP_AXIS
    return P(*spec)


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
                    rules: Sequence[tuple[str, str]] | None = None, min_size: int = 0):
    """A pytree like `state` (an nnx State, or any pytree of arrays / ShapeDtypeStructs) with
    a NamedSharding on `mesh` (axes include "fsdp") for every leaf. rules None: DEFAULT_RULES."""
    if FSDP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} lack {FSDP_AXIS!r}")
    size = mesh.shape[FSDP_AXIS]
    rules = DEFAULT_RULES if rules is None else check_rules(rules)

    def one(keypath, leaf):
        spec = partition_spec(path_str(keypath), np.shape(leaf), tactic=tactic,
                              fsdp_size=size, rules=rules, min_size=min_size)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def _tactic(mesh_config) -> tuple[str, tuple[tuple[str, str], ...]]:
    get = mesh_config.get if hasattr(mesh_config, "get") else lambda k, d=None: d
    tactic = get("param_tactic", "fsdp")
    if tactic not in PARAM_TACTICS:
        raise ShardingRulesError(f"mesh.param_tactic must be one of {PARAM_TACTICS}, got "
                                 f"{tactic!r}")
    rules = get("rules", None)
    return tactic, DEFAULT_RULES if rules is None else check_rules(rules, "mesh.rules")


def rules_from_config(mesh_config) -> tuple[tuple[str, str], ...]:
    """The rule table for model parameters that a `config.mesh` section asks for: `mesh.rules`
    (checked; absent: DEFAULT_RULES), or REPLICATE_ALL when `mesh.param_tactic` is "replicate"
    or "zero"."""
    tactic, rules = _tactic(mesh_config)
    return REPLICATE_ALL if tactic in ("replicate", "zero") else rules


def state_rules_from_config(mesh_config) -> tuple[tuple[str, str], ...]:
    """The rule table for the trainer's optimiser state and gradient accumulator: the
    parameters' (`rules_from_config`), except under "zero", where `mesh.rules` split them."""
    tactic, rules = _tactic(mesh_config)
    return rules if tactic == "zero" else rules_from_config(mesh_config)


def param_shardings_from_config(abstract_state, mesh: Mesh, mesh_config):
    """`param_shardings` of `abstract_state` with the tactic and rules of `mesh_config` (the
    `config.mesh` section). Errors in the section name its key (`mesh.rules[1]: ...`)."""
    return param_shardings(abstract_state, mesh, rules=rules_from_config(mesh_config))


def describe(shardings) -> dict[str, str]:
    """path -> str(PartitionSpec), for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_str(k): str(s.spec) for k, s in flat}


def shard_state(state, mesh: Mesh, **kwargs):
    """`state` placed on `mesh` by `param_shardings(state, mesh, **kwargs)`."""
    return jax.device_put(state, param_shardings(state, mesh, **kwargs))
