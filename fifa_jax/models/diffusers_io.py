"""The diffusers model-folder layout shared by the UNet and the VAE.

    <folder>/config.json
    <folder>/diffusion_pytorch_model[.<variant>].safetensors  (or a sharded .index.json)

Models are filled strictly from PyTorch-named tensors (`torch_names.fill_from_torch`), one
tensor at a time, each placed on its device(s) as it is read (with a mesh: straight into its
NamedSharding), and written back as float32 with the PyTorch names and `{"format": "pt"}`
metadata; sharded params are gathered one tensor at a time, and on several hosts only process 0
writes.
"""
from __future__ import annotations

import json
import os

import jax
from flax import nnx

from fifa_jax.files import read_json
from fifa_jax.models.safetensors_io import LazySafetensors, find_weights, write_safetensors
from fifa_jax.models.torch_names import export_to_torch, fill_from_torch

WEIGHTS_STEM = "diffusion_pytorch_model"


def read_folder_json(path: str, name: str, missing: str) -> dict:
    """The JSON file `name` of folder `path`; FileNotFoundError(`missing`) when absent."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(missing)
    return read_json(file, "a diffusers config")


def read_config(path: str) -> dict:
    """The config.json dict of a diffusers model folder."""
    return read_folder_json(path, "config.json", f"no config.json in {path}")


def fill_from_folder(model: nnx.Module, path: str, renames, variant: str | None = None, *,
                     mesh=None, rules=None):
    """Fill an abstract model from the folder's weights; strict (errors name the key).
    mesh / rules: see `torch_names.fill_params` (None: params on the default device)."""
    weights = find_weights(path, [WEIGHTS_STEM], variant)
    return fill_from_torch(model, LazySafetensors(weights), renames, weights, mesh=mesh,
                           rules=rules)


def save_to_folder(model: nnx.Module, path: str, class_name: str, renames) -> None:
    """Write the model's original config (with `_class_name`) and float32 PyTorch weights.

    Every process must call this (parameters spanning hosts are all-gathered); process 0 writes.
    """
    tensors = export_to_torch(model, renames)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    config = json.loads(model.config.raw_json)
    config["_class_name"] = class_name
    config.setdefault("_diffusers_version", "0.30.0")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(tensors, os.path.join(path, WEIGHTS_STEM + ".safetensors"))
