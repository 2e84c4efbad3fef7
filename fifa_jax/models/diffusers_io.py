"""The diffusers model-folder layout shared by the UNet and the VAE.

    <folder>/config.json
    <folder>/diffusion_pytorch_model[.<variant>].safetensors  (or a sharded .index.json)

Models are filled strictly from PyTorch-named tensors (`torch_names.fill_from_torch`) and written
back as float32 with the PyTorch names and `{"format": "pt"}` metadata.
"""
from __future__ import annotations

import json
import os

from flax import nnx

from fifa_jax.models.safetensors_io import find_weights, read_safetensors, write_safetensors
from fifa_jax.models.torch_names import export_to_torch, fill_from_torch

WEIGHTS_STEM = "diffusion_pytorch_model"


def read_folder_json(path: str, name: str, missing: str) -> dict:
    """The JSON file `name` of folder `path`; FileNotFoundError(`missing`) when absent."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(missing)
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_config(path: str) -> dict:
    """The config.json dict of a diffusers model folder."""
    return read_folder_json(path, "config.json", f"no config.json in {path}")


def fill_from_folder(model: nnx.Module, path: str, renames, variant: str | None = None):
    """Fill an abstract model from the folder's weights; strict (errors name the key)."""
    weights = find_weights(path, [WEIGHTS_STEM], variant)
    return fill_from_torch(model, read_safetensors(weights), renames, weights)


def save_to_folder(model: nnx.Module, path: str, class_name: str, renames) -> None:
    """Write the model's original config (with `_class_name`) and float32 PyTorch weights."""
    os.makedirs(path, exist_ok=True)
    config = json.loads(model.config.raw_json)
    config["_class_name"] = class_name
    config.setdefault("_diffusers_version", "0.30.0")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(export_to_torch(model, renames),
                      os.path.join(path, WEIGHTS_STEM + ".safetensors"))
