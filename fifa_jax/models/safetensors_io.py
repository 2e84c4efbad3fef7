"""Read and write PyTorch-layout safetensors checkpoints (diffusers / transformers).

Handles a single file, a sharded `*.safetensors.index.json`, and fp16 `variant` files. Strict
matching: `check_keys` raises naming every missing, unexpected or mis-shaped key.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from fifa_jax.errors import InputError


class CheckpointMismatchError(InputError):
    """A checkpoint's keys or shapes do not match the model."""


def _candidates(folder: str, stem: str, variant: str | None) -> list[str]:
    names = []
    if variant:
        # diffusers / transformers name a sharded variant's index
        # `<stem>.safetensors.index.<variant>.json`
        names += [f"{stem}.safetensors.index.{variant}.json",
                  f"{stem}.{variant}.safetensors.index.json", f"{stem}.{variant}.safetensors"]
    names += [f"{stem}.safetensors.index.json", f"{stem}.safetensors"]
    return [os.path.join(folder, n) for n in names]


def find_weights(path: str, stems: Iterable[str], variant: str | None = None) -> str:
    """The weight file (or index) in folder `path` for one of `stems`, e.g. "model"."""
    if os.path.isfile(path):
        return path
    tried = []
    for stem in stems:
        for cand in _candidates(path, stem, variant):
            tried.append(cand)
            if os.path.exists(cand):
                return cand
    raise FileNotFoundError(f"no safetensors weights in {path}; looked for {tried}")


def is_index(path: str) -> bool:
    """True for a sharded checkpoint's index: `<stem>.safetensors.index.json`, or a variant's
    `<stem>.safetensors.index.<variant>.json` / `<stem>.<variant>.safetensors.index.json`."""
    return path.endswith(".json") and ".safetensors.index" in os.path.basename(path)


def read_index(path: str) -> tuple[dict[str, str], list[str]]:
    """A sharded index -> (weight_map {key: shard file name}, sorted shard paths)."""
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(f"{path}: not a safetensors index with a 'weight_map' "
                                      f"({type(e).__name__}: {e})") from e
    folder = os.path.dirname(path)
    return weight_map, [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file or a sharded index (see `is_index`).

    bfloat16 tensors come back as float32 (numpy has no bfloat16 in safetensors.numpy).
    """
    if is_index(path):
        weight_map, shards = read_index(path)
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(read_safetensors(shard))
        missing = set(weight_map) - set(out)
        if missing:
            raise CheckpointMismatchError(f"{path}: index names keys absent from shards: "
                                          f"{sorted(missing)[:10]}")
        return out
    try:
        return dict(load_file(path))
    except TypeError:  # bfloat16 needs torch-free handling via safe_open + ml_dtypes
        from safetensors import safe_open
        out = {}
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
    """Write numpy arrays in PyTorch layout with the metadata PyTorch loaders expect."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # np.require keeps 0-d tensors 0-d (ascontiguousarray would make them (1,)).
    arrays = {k: np.require(np.asarray(v), requirements="C") for k, v in tensors.items()}
    save_file(arrays, path, metadata={"format": "pt"})


def check_keys(expected: Mapping[str, tuple], got: Mapping[str, np.ndarray], source: str) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected or mis-shaped key.

    Args:
      expected: PyTorch key -> expected shape.
      got: PyTorch key -> array, as read from `source`.
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(expected) & set(got)
                    if tuple(expected[k]) != tuple(np.shape(got[k])))
    if not (missing or unexpected or shaped):
        return
    lines = [f"checkpoint {source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    for k in shaped[:20]:
        lines.append(f"  wrong shape for {k}: checkpoint {tuple(np.shape(got[k]))}, "
                     f"model {tuple(expected[k])}")
    raise CheckpointMismatchError("\n".join(lines))


# Layout rules between PyTorch and Flax.
def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """[O, I, kh, kw] -> [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_torch(w: np.ndarray) -> np.ndarray:
    """[kh, kw, I, O] -> [O, I, kh, kw]."""
    return np.transpose(w, (3, 2, 0, 1))


def linear_to_flax(w: np.ndarray) -> np.ndarray:
    """[out, in] -> [in, out]."""
    return np.transpose(w)


linear_to_torch = linear_to_flax


_LAYOUTS = {"conv": (conv_to_torch, conv_to_flax), "linear": (linear_to_torch, linear_to_flax)}


def to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """A Flax parameter of layout `kind` ("conv", "linear"; anything else is kept) in PyTorch's."""
    return _LAYOUTS[kind][0](a) if kind in _LAYOUTS else a


def to_flax_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """A PyTorch tensor of layout `kind` ("conv", "linear"; anything else is kept) in Flax's."""
    return _LAYOUTS[kind][1](a) if kind in _LAYOUTS else a
