"""Write a trained UNet as a diffusers model folder, and a whole pipeline folder around it.

    <unet_dir>/config.json                                        the UNet config, _class_name set
    <unet_dir>/diffusion_pytorch_model.safetensors                float32, PyTorch names/layout
    <unet_dir>/diffusion_pytorch_model.<v>.safetensors            variants: v = fp16 | bf16
  or, past `max_shard_bytes`, diffusers' sharded layout:
    <unet_dir>/diffusion_pytorch_model[.<v>]-00001-of-00003.safetensors ...
    <unet_dir>/diffusion_pytorch_model.safetensors.index[.<v>].json
        {"metadata": {"total_size": bytes of all tensors}, "weight_map": {key: shard file}}

Names follow diffusers' `_add_variant` and `save_pretrained` (shards `<stem>.<v>-0000i-of-0000n`,
index `<stem>.safetensors.index.<v>.json`), so `from_pretrained(..., variant=v)` and our
`load_unet` both find them. Every file is written to a temporary name and renamed into place,
with `{"format": "pt"}` metadata; weight files of a previous export in the same folder that the
new one does not produce (old shards, variants not asked for now) are removed afterwards.

`write_pipeline_folder` assembles <out>/model_index.json + the base pipeline's other components
(hard links where the filesystem allows, else copies; never symlinks) + <out>/unet.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from fifa_jax.errors import InputError
from fifa_jax.models.diffusers_io import WEIGHTS_STEM, read_config
from fifa_jax.models.pipeline import _present, read_model_index
from fifa_jax.models.safetensors_io import check_keys, find_weights
from fifa_jax.models.torch_names import export_to_torch
from fifa_jax.models.unet_io import UNET_RENAMES, abstract_unet, unet_name_map

VARIANT_DTYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
DIFFUSERS_VERSION = "0.30.0"
UNET_CLASS = "UNet2DConditionModel"


class ExportError(InputError):
    """A base pipeline folder or UNet folder that cannot be exported from."""


def unet_tensors(model) -> dict[str, np.ndarray]:
    """PyTorch key -> float32 array in PyTorch layout (conv (O, I, kh, kw), linear (O, I)).

    The params must be addressable from this process (one host, or gathered first)."""
    return export_to_torch(model, UNET_RENAMES)


def _variant_name(name: str, variant: str | None) -> str:
    """diffusers' `_add_variant`: the variant goes before the last extension."""
    if not variant:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def _is_weight_file(name: str) -> bool:
    """A weight file or index of any dtype / variant in a diffusers model folder."""
    return name.startswith(WEIGHTS_STEM) and (
        name.endswith(".safetensors") or (".safetensors.index" in name and name.endswith(".json")))


def _atomic_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_safetensors(arrays: Mapping[str, np.ndarray], path: str,
                        metadata: Mapping[str, str] | None = None) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(dict(arrays), tmp, metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0)              # safetensors creates 0600 files: give the usual mode
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def shard_plan(tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None
               ) -> list[list[str]]:
    """Keys grouped into shards in sorted order, each at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own); one group when everything fits or no limit is given."""
    keys = sorted(tensors)
    if max_shard_bytes is None or sum(tensors[k].nbytes for k in keys) <= max_shard_bytes:
        return [keys]
    shards, size = [[]], 0
    for k in keys:
        n = tensors[k].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _write_weights(tensors: Mapping[str, np.ndarray], out_dir: str, variant: str | None,
                   max_shard_bytes: int | None) -> list[str]:
    """Write one dtype's weights (single file or shards + index); returns the file names."""
    plan = shard_plan(tensors, max_shard_bytes)
    if len(plan) == 1:
        name = _variant_name(f"{WEIGHTS_STEM}.safetensors", variant)
        _atomic_safetensors(tensors, os.path.join(out_dir, name))
        return [name]
    stem = WEIGHTS_STEM + (f".{variant}" if variant else "")
    weight_map, names = {}, []
    for i, keys in enumerate(plan):
        name = f"{stem}-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        _atomic_safetensors({k: tensors[k] for k in keys}, os.path.join(out_dir, name))
        weight_map.update({k: name for k in keys})
        names.append(name)
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
             "weight_map": weight_map}
    index_name = _variant_name(f"{WEIGHTS_STEM}.safetensors.index.json", variant)
    _atomic_bytes(os.path.join(out_dir, index_name),
                  (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return names + [index_name]


def write_unet_folder(model_or_tensors, config: Mapping | None, out_dir: str, *,
                      variants: Sequence[str] = (), max_shard_bytes: int | None = None) -> str:
    """Write a diffusers UNet2DConditionModel folder.

    Args:
      model_or_tensors: our UNet2DConditionModel, or PyTorch key -> array (e.g. `unet_tensors`),
        checked strictly (every key, every shape) against `config`.
      config: the original diffusers UNet config dict; None takes the model's own.
      out_dir: created if absent; any weight files already there are replaced.
      variants: extra low-precision copies, names from VARIANT_DTYPES ("fp16", "bf16").
      max_shard_bytes: shard any dtype's weights that exceed this many bytes.
    Returns:
      out_dir.
    """
    unknown = [v for v in variants if v not in VARIANT_DTYPES]
    if unknown:
        raise ValueError(f"unknown weight variants {unknown}; expected some of "
                         f"{sorted(VARIANT_DTYPES)}")
    if isinstance(model_or_tensors, nnx.Module):
        tensors = unet_tensors(model_or_tensors)
        if config is None:
            config = json.loads(model_or_tensors.config.raw_json)
    else:
        if config is None:
            raise ValueError("write_unet_folder: a tensor dict needs its UNet config")
        tensors = {k: np.asarray(v, np.float32) for k, v in model_or_tensors.items()}
    config = {**config, "_class_name": UNET_CLASS}
    config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    names = unet_name_map(abstract_unet(config))
    check_keys({k: v[2] for k, v in names.items()}, tensors, f"the UNet written to {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    _atomic_bytes(os.path.join(out_dir, "config.json"),
                  (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    written = set()
    for variant in (None, *variants):
        dtype = VARIANT_DTYPES[variant] if variant else np.dtype(np.float32)
        arrays = {k: np.require(v.astype(dtype), requirements="C") for k, v in tensors.items()}
        written.update(_write_weights(arrays, out_dir, variant, max_shard_bytes))
    for name in os.listdir(out_dir):  # an older export's files (other shards, variants) go
        if name not in written and _is_weight_file(name):
            os.remove(os.path.join(out_dir, name))
    return out_dir


def _link_tree(src: str, dst: str) -> None:
    """Recreate `src` under `dst`: files hard-linked (symlinks resolved first), copied when
    linking fails (another filesystem, no permission)."""
    for root, _, files in os.walk(src, followlinks=True):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            real = os.path.realpath(os.path.join(root, name))
            out = os.path.join(target, name)
            try:
                os.link(real, out)
            except OSError:
                shutil.copy2(real, out)


def write_pipeline_folder(base_path: str, unet_dir: str, out_dir: str) -> str:
    """A diffusers pipeline folder: `base_path`'s model_index.json and components, but unet/
    from `unet_dir`.

    Components whose index entry is absent or [null, null] stay absent; a component the base's
    model_index.json names but whose folder is missing raises ExportError naming it. The folder
    is assembled next to `out_dir` and renamed into place (replacing an older one). Files are
    hard links where possible: the base's writers replace files by rename, never in place.
    """
    base_path, out_dir = os.path.abspath(base_path), os.path.abspath(out_dir)
    index = read_model_index(base_path)
    components = sorted(k for k in index if not k.startswith("_") and _present(index, k)
                        and k != "unet")
    for name in components:
        if not os.path.isdir(os.path.join(base_path, name)):
            raise ExportError(f"{base_path}/model_index.json names component {name!r} but the "
                              f"folder {os.path.join(base_path, name)} is missing")
    try:
        read_config(unet_dir)
        find_weights(unet_dir, [WEIGHTS_STEM])
    except FileNotFoundError as e:
        raise ExportError(f"{unet_dir} is not a diffusers UNet folder: {e}") from e
    index.setdefault("unet", ["diffusers", UNET_CLASS])
    tmp, old = f"{out_dir}.tmp{os.getpid()}", f"{out_dir}.old{os.getpid()}"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(tmp)
    for name in components:
        _link_tree(os.path.join(base_path, name), os.path.join(tmp, name))
    _link_tree(unet_dir, os.path.join(tmp, "unet"))
    _atomic_bytes(os.path.join(tmp, "model_index.json"),
                  (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def write_lora(folder: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
               ) -> str:
    """<folder>/pytorch_lora_weights.safetensors (float32, `{"format": "pt"}` + `metadata`),
    written to a temporary name and renamed into place; returns its path."""
    from fifa_jax.training.lora import WEIGHTS_NAME
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHTS_NAME)
    _atomic_safetensors({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
                        path, {f"fifa_jax.lora_{k}": v for k, v in metadata.items()})
    return path
