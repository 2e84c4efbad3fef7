"""Load and save the decoder LM in transformers' safetensors layout, with FSDP shardings.

Name map (strict, by rule since module names mirror transformers'): the Flax path joined by
"." with the leaf renamed `kernel -> weight` (transposed, [in, out] <-> [out, in]),
`embedding -> weight`, `bias`/`weight` unchanged; e.g. `model.layers.0.self_attn.q_proj.kernel`
<-> `model.layers.0.self_attn.q_proj.weight`. A tied checkpoint that still stores
`lm_head.weight` is accepted (the copy is ignored); a Gemma3 image-text checkpoint loads its
language model (`checkpoint_names`); rotary `inv_freq` buffers saved by older transformers
versions are checked against the config and not loaded. Tensors are read one at a time through a
memory map (F32/F16/BF16 -> float32), so host memory stays near one tensor.
"""
from __future__ import annotations

import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fifa_jax.models.llm import DecoderLM
from fifa_jax.models.llm_config import LMConfig, load_lm_config
from fifa_jax.models.llm_layers import rope_inv_freq
from fifa_jax.models.safetensors_io import (CheckpointMismatchError, check_keys, find_weights,
                                           is_index, read_index, write_safetensors)

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "BF16": np.uint16}


class LazySafetensors:
    """Shapes of every tensor of a `.safetensors` file or sharded index, tensors on demand."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, tuple[str, dict, int]] = {}
        wmap, files = read_index(path) if is_index(path) else ({}, [path])
        for file in files:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self._where[key] = (file, info, 8 + n)
        missing = set(wmap) - set(self._where)
        if missing:
            raise CheckpointMismatchError(f"{path}: index names keys absent from shards: "
                                          f"{sorted(missing)[:10]}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(info["shape"]) for k, (_, info, _) in self._where.items()}

    def get(self, key: str) -> np.ndarray:
        """The tensor as float32 (floating types) or its own integer type."""
        file, info, base = self._where[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        arr = np.frombuffer(raw, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32)
        return np.array(arr)


def _names(keypath) -> tuple:
    out = []
    for k in keypath:
        name = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
        if name == "value":
            continue
        out.append(name)
    return tuple(out)


def torch_key(path: tuple) -> tuple[str, bool]:
    """Flax param path -> (transformers key, transpose?)."""
    *head, leaf = [str(p) for p in path]
    if leaf == "kernel":
        return ".".join(head + ["weight"]), True
    if leaf in ("embedding", "weight"):
        return ".".join(head + ["weight"]), False
    if leaf == "bias":
        return ".".join(head + ["bias"]), False
    raise ValueError(f"no checkpoint name rule for parameter {'.'.join(map(str, path))}")


_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head."))


def checkpoint_names(shapes: dict) -> dict[str, str]:
    """Checkpoint key -> our key. Gemma3 multimodal checkpoints keep their language model
    under `language_model.model.*` (hub) or `model.language_model.*`; their vision tower and
    projector are left out. Other checkpoints map to themselves."""
    multimodal = any(k.startswith(p) for k in shapes for p, _ in _TEXT_PREFIXES[:2])
    if not multimodal:
        return {k: k for k in shapes}
    out = {}
    for k in shapes:
        if k.startswith(_VISION_PREFIXES):
            continue
        for theirs, ours in _TEXT_PREFIXES:
            if k.startswith(theirs):
                out[k] = ours + k[len(theirs):]
                break
        else:
            out[k] = k     # unexpected: kept so check_keys names it
    return out


def check_derived_buffers(reader: "LazySafetensors", cfg: LMConfig) -> set[str]:
    """Keys of rotary `inv_freq` buffers that older transformers versions saved
    (`model.layers.<i>.self_attn.rotary_emb.inv_freq`). They are derived from the config, so
    they are not loaded; each must equal the config's frequencies, else the config and the
    weights disagree and the error names the key. Returns the keys to leave out."""
    keys = {k for k in reader.shapes() if k.endswith("rotary_emb.inv_freq")}
    for key in sorted(keys):
        m = re.search(r"layers\.(\d+)\.", key)
        layer_type = cfg.layer_types[int(m.group(1))] if m and int(m.group(1)) < len(
            cfg.layer_types) else "full_attention"
        want = rope_inv_freq(cfg.rope_for(layer_type), cfg.head_dim)
        got = reader.get(key)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=0):
            raise CheckpointMismatchError(
                f"{reader.path}: {key} (a saved rotary buffer) does not match the frequencies "
                f"config.json gives (rope {cfg.rope_for(layer_type)}, head_dim {cfg.head_dim})")
    return keys


def abstract_model(cfg: LMConfig, *, dtype=jnp.float32, attn_impl: str = "auto") -> DecoderLM:
    """The model with ShapeDtypeStruct parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: DecoderLM(cfg, dtype=dtype, attn_impl=attn_impl,
                                            rngs=nnx.Rngs(0)))


def expected_shapes(model: DecoderLM) -> dict[str, tuple[int, ...]]:
    """transformers key -> PyTorch-layout shape for every parameter of `model`."""
    _, state = nnx.split(model)
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(state):
        key, transpose = torch_key(_names(kp))
        out[key] = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)
    return out


def fsdp_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh | None) -> P:
    """Shard the largest dim divisible by the mesh's "fsdp" size; small or 1-D: replicate."""
    size = 1 if mesh is None else dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
    if size <= 1 or len(shape) < 2:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: (-shape[d], d))
    for d in dims:
        if shape[d] % size == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def put_global(arr: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) placed as a global array with `sharding`."""
    if jax.process_count() == 1:
        return jax.device_put(arr, sharding)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _default_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "fsdp"))


def load_llm(path: str, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
             attn_impl: str = "auto", variant: str | None = None) -> DecoderLM:
    """DecoderLM from a transformers folder; params float32, FSDP-sharded over `mesh`.

    `variant` (e.g. "fp16") prefers `model.<variant>.safetensors` or a variant's sharded index.

    Raises CheckpointMismatchError naming every missing, unexpected or mis-shaped key.
    """
    cfg = load_lm_config(path)
    weights = find_weights(path, ["model"], variant)
    reader = LazySafetensors(weights)
    derived = check_derived_buffers(reader, cfg)
    rename = {k: v for k, v in checkpoint_names(reader.shapes()).items() if k not in derived}
    shapes = {rename[k]: s for k, s in reader.shapes().items() if k in rename}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    model = abstract_model(cfg, dtype=dtype, attn_impl=attn_impl)
    check_keys(expected_shapes(model),
               {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, weights)
    mesh = mesh or _default_mesh()
    graphdef, abstract = nnx.split(model)
    file_key = {ours: theirs for theirs, ours in rename.items()}

    def fill(kp, leaf):
        key, transpose = torch_key(_names(kp))
        arr = reader.get(file_key[key])
        arr = np.ascontiguousarray(arr.T if transpose else arr).astype(np.float32)
        return put_global(arr, NamedSharding(mesh, fsdp_spec(arr.shape, mesh)))

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    return nnx.merge(graphdef, state)


def state_shardings(model: DecoderLM, mesh: jax.sharding.Mesh):
    """NamedSharding pytree matching `nnx.split(model)[1]`, by `fsdp_spec`."""
    _, state = nnx.split(model)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh)), state)


def random_torch_weights(cfg: LMConfig, seed: int, std: float = 0.02) -> dict[str, np.ndarray]:
    """Random float32 weights in transformers layout (norm weights near their identity)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(expected_shapes(abstract_model(cfg)).items()):
        if key.endswith("norm.weight"):
            base = 0.0 if cfg.norm_plus_one else 1.0
            out[key] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def save_checkpoint(folder: str, hf_config: dict, weights: dict[str, np.ndarray]) -> None:
    """Write `config.json` + `model.safetensors` that transformers' `from_pretrained` loads."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    write_safetensors(weights, os.path.join(folder, "model.safetensors"))
