"""Name and layout map between nnx parameter paths and PyTorch state-dict keys.

An nnx path such as ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel') joins with dots; the
leaf `kernel` becomes `weight` (conv [kh, kw, I, O] <-> [O, I, kh, kw], linear [I, O] <-> [O, I]),
`scale` becomes `weight`, `bias` stays. A per-model list of (regex, replacement) renames
covers the module names that differ (e.g. `to_out.` -> `to_out.0.`).

`fill_params` is the one loader fill of every model (UNet, VAE, CLIP, LM): tensors are read one
at a time (a lazy mapping such as `LazySafetensors` keeps host memory near one tensor), laid out
for Flax, and placed on their device(s) at once: with a mesh, straight into the NamedSharding
`param_sharding.param_shardings` decides (each device gets its slice only).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.models.safetensors_io import (check_shapes, tensor_shapes, to_flax_layout,
                                           to_torch_layout)
from fifa_jax.parallel.mesh import put_global, to_host
from fifa_jax.parallel.param_sharding import param_shardings


def _kind(path: tuple, ndim: int) -> str:
    if path[-1] == "kernel":
        return {4: "conv", 2: "linear"}[ndim]
    return "same"


def _torch_shape(shape: tuple, kind: str) -> tuple:
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "linear":
        return (shape[1], shape[0])
    return tuple(shape)


def _flat_params(model) -> list[tuple[tuple, object]]:
    return [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def name_map(model, renames: Iterable[tuple[str, str]]) -> dict[str, tuple[tuple, str, tuple]]:
    """PyTorch key -> (nnx path, layout kind, PyTorch shape) for every nnx.Param of `model`.

    Works on abstract models (`nnx.eval_shape`) as well as concrete ones.
    """
    out = {}
    for path, var in _flat_params(model):
        shape = tuple(var.get_value().shape)
        kind = _kind(path, len(shape))
        leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
        key = ".".join(str(p) for p in path[:-1] + (leaf,))
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        if key in out:
            raise RuntimeError(f"name map collision on {key}: {out[key][0]} and {path}")
        out[key] = (path, kind, _torch_shape(shape, kind))
    return out


def _path(keypath) -> tuple:
    """nnx State key path -> the param path of `nnx.to_flat_state` (str / int parts)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        out.append(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return tuple(out)


def fill_params(abstract_model, names: Mapping[str, tuple[tuple, str, tuple]],
                tensors: Mapping[str, np.ndarray], source: str, *, mesh=None, rules=None):
    """A concrete model with `abstract_model`'s structure and params from PyTorch `tensors`.

    Args:
      abstract_model: the model from `nnx.eval_shape` (ShapeDtypeStruct params).
      names: PyTorch key -> (nnx path, layout kind, PyTorch shape) for every param (a model's
        `name_map`); every leaf of the model's state must be named.
      tensors: PyTorch key -> array, or a lazy mapping (`LazySafetensors`, `RenamedTensors`)
        read one key at a time.
      source: the file named in errors.
      mesh: None: each param on the default device, as `jnp.asarray` puts it. A Mesh with an
        "fsdp" axis: each param goes straight into its NamedSharding from
        `param_shardings(abstract state, mesh, rules=rules)` (no whole copy on one device).
      rules: (regex, tactic) pairs for that decision (None: param_sharding.DEFAULT_RULES).
    Strict: raises CheckpointMismatchError naming missing / unexpected / mis-shaped keys.
    Params become float32 (fp16 / bf16 checkpoints are upcast).
    """
    check_shapes({k: v[2] for k, v in names.items()}, tensor_shapes(tensors), source)
    graphdef, state = nnx.split(abstract_model)
    by_path = {tuple(path): (key, kind) for key, (path, kind, _) in names.items()}

    def one(keypath, leaf, sharding=None):
        path = _path(keypath)
        if path not in by_path:
            raise ValueError(f"{source}: model state leaf {'.'.join(map(str, path))} has no "
                             f"PyTorch name (not an nnx.Param?)")
        key, kind = by_path[path]
        # np.require keeps 0-d params 0-d (ascontiguousarray would make them (1,))
        arr = np.require(to_flax_layout(kind, np.asarray(tensors[key], np.float32)),
                         requirements="C")
        if arr.shape != tuple(leaf.shape):
            raise ValueError(f"{source}: {key} laid out as {arr.shape}, model wants {leaf.shape}")
        return jnp.asarray(arr) if sharding is None else put_global(arr, sharding)

    if mesh is None:
        state = jax.tree_util.tree_map_with_path(one, state)
    else:
        shardings = param_shardings(state, mesh, rules=rules)
        state = jax.tree_util.tree_map_with_path(one, state, shardings)
    return nnx.merge(graphdef, state)


def fill_from_torch(abstract_model, tensors: Mapping[str, np.ndarray],
                    renames: Iterable[tuple[str, str]], source: str, *, mesh=None, rules=None):
    """`fill_params` with the name map from `renames` (UNet, VAE)."""
    return fill_params(abstract_model, name_map(abstract_model, renames), tensors, source,
                       mesh=mesh, rules=rules)


def export_to_torch(model, renames: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """PyTorch key -> float32 numpy array in PyTorch layout, for every param of `model`.

    Params sharded over this process' devices are gathered one at a time; params spanning
    several hosts are all-gathered (`parallel.to_host`, a collective: every process must call
    this, in the same order).
    """
    names = name_map(model, renames)
    values = {path: var.get_value() for path, var in _flat_params(model)}
    return {key: np.ascontiguousarray(
                to_torch_layout(kind, np.asarray(to_host(values[path]), np.float32)))
            for key, (path, kind, _) in names.items()}


def count_params(model) -> int:
    """Number of scalar parameters (nnx.Param) of a concrete or abstract model."""
    return int(sum(np.prod(var.get_value().shape, dtype=np.int64)
                   for _, var in _flat_params(model)))
