"""Name and layout map between nnx parameter paths and PyTorch state-dict keys.

An nnx path such as ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel') joins with dots; the
leaf `kernel` becomes `weight` (conv [kh, kw, I, O] <-> [O, I, kh, kw], linear [I, O] <-> [O, I]),
`scale` becomes `weight`, `bias` stays. A per-model list of (regex, replacement) renames
covers the module names that differ (e.g. `to_out.` -> `to_out.0.`).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.models.safetensors_io import check_keys, to_flax_layout, to_torch_layout


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


def fill_from_torch(abstract_model, tensors: Mapping[str, np.ndarray],
                    renames: Iterable[tuple[str, str]], source: str):
    """A concrete model with `abstract_model`'s structure and params from PyTorch `tensors`.

    Strict: raises CheckpointMismatchError naming missing / unexpected / mis-shaped keys.
    Params become float32 (fp16 / bf16 checkpoints are upcast).
    """
    names = name_map(abstract_model, renames)
    check_keys({k: v[2] for k, v in names.items()}, tensors, source)
    graphdef, state = nnx.split(abstract_model)
    pure = nnx.to_pure_dict(state)
    for key, (path, kind, _) in names.items():
        arr = to_flax_layout(kind, np.asarray(tensors[key], dtype=np.float32))
        node = pure
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = jnp.asarray(arr)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def export_to_torch(model, renames: Iterable[tuple[str, str]]) -> dict[str, np.ndarray]:
    """PyTorch key -> float32 numpy array in PyTorch layout, for every param of `model`."""
    names = name_map(model, renames)
    values = {path: var.get_value() for path, var in _flat_params(model)}
    return {key: np.ascontiguousarray(to_torch_layout(kind, np.asarray(values[path], np.float32)))
            for key, (path, kind, _) in names.items()}


def count_params(model) -> int:
    """Number of scalar parameters (nnx.Param) of a concrete or abstract model."""
    return int(sum(np.prod(var.get_value().shape, dtype=np.int64)
                   for _, var in _flat_params(model)))
