"""Read and write PyTorch-layout safetensors checkpoints (diffusers / transformers).

Handles a single file, a sharded `*.safetensors.index.json`, and fp16 `variant` files. Strict
matching: `check_keys` raises naming every missing, unexpected or mis-shaped key.
`LazySafetensors` reads the header(s) only and each tensor on demand through a memory map, so
loaders hold about one tensor in host memory at a time.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Mapping

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
    read_header(path)              # a truncated or foreign file: one line naming it
    try:
        return dict(load_file(path))
    except TypeError:  # bfloat16 needs torch-free handling via safe_open + ml_dtypes
        from safetensors import safe_open
        out = {}
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        return out


def read_header(file: str) -> tuple[dict, int]:
    """A .safetensors file's tensor table and header length, checked against the file's size
    (a file cut short, or not a safetensors file, is an error naming it)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointMismatchError(f"{file}: {size} bytes, too short for a safetensors "
                                          f"file (truncated or empty)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointMismatchError(f"{file}: not a safetensors file, or truncated (its "
                                          f"header claims {n} bytes; the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointMismatchError(f"{file}: not a safetensors file (unreadable header:"
                                          f" {e})") from e
    if not isinstance(header, dict):
        raise CheckpointMismatchError(f"{file}: not a safetensors file (header is not a table)")
    header.pop("__metadata__", None)
    end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointMismatchError(
            f"{file}: truncated: its tensors need {8 + n + end} bytes, the file has {size} "
            f"(an interrupted download or copy; fetch the file again)")
    return header, n


_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "BF16": np.uint16}


class LazySafetensors(Mapping):
    """The tensors of a `.safetensors` file or sharded index as a read-only mapping: the keys
    and `shapes()` come from the headers; `reader[key]` (= `get`) reads that one tensor."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, tuple[str, dict, int]] = {}
        wmap, files = read_index(path) if is_index(path) else ({}, [path])
        for file in files:
            header, n = read_header(file)
            for key, info in header.items():
                self._where[key] = (file, info, 8 + n)
        missing = set(wmap) - set(self._where)
        if missing:
            raise CheckpointMismatchError(f"{path}: index names keys absent from shards: "
                                          f"{sorted(missing)[:10]}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(info["shape"]) for k, (_, info, _) in self._where.items()}

    def get(self, key: str, default=None) -> np.ndarray:
        """The tensor as float32 (floating types) or its own integer type."""
        if key not in self._where:
            return default
        file, info, base = self._where[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end == start:   # an empty tensor: nothing to map
            arr = np.zeros(info["shape"], _DTYPES[info["dtype"]])
        else:
            raw = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start,
                            shape=(end - start,))
            arr = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32)
        return np.array(arr)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(key)
        return self.get(key)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class RenamedTensors(Mapping):
    """A view of `tensors` under other names: `names` maps each new key to its key in
    `tensors` (keys left out of `names` are hidden). Reads stay lazy."""

    def __init__(self, tensors: Mapping[str, np.ndarray], names: Mapping[str, str]):
        self.tensors, self.names = tensors, dict(names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        theirs = tensor_shapes(self.tensors)
        return {ours: theirs[k] for ours, k in self.names.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[self.names[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def tensor_shapes(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    """key -> shape, without reading the tensors of a lazy mapping (one with `shapes()`)."""
    if hasattr(tensors, "shapes"):
        return dict(tensors.shapes())
    return {k: tuple(np.shape(v)) for k, v in tensors.items()}


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
      got: PyTorch key -> array (or a lazy mapping with `shapes()`), as read from `source`.
    """
    check_shapes(expected, tensor_shapes(got), source)


def check_shapes(expected: Mapping[str, tuple], got: Mapping[str, tuple], source: str) -> None:
    """`check_keys` on shapes: expected and got both map PyTorch key -> shape."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(expected) & set(got)
                    if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unexpected or shaped):
        return
    lines = [f"checkpoint {source} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    for k in shaped[:20]:
        lines.append(f"  wrong shape for {k}: checkpoint {tuple(got[k])}, "
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
