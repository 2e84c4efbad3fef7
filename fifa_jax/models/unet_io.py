"""Load / save the SD UNet in the diffusers folder layout (config.json + safetensors).

`load_unet(path)` builds the model abstractly (no eager init), then fills it from
`diffusion_pytorch_model[.variant].safetensors` or its sharded `.index.json`, strictly.
`save_unet(model, path)` writes the original config and PyTorch-named float32 safetensors.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.safetensors_io import find_weights, read_safetensors, write_safetensors
from fifa_jax.models.torch_names import export_to_torch, fill_from_torch, name_map
from fifa_jax.models.unet import UNet2DConditionModel

WEIGHTS_STEM = "diffusion_pytorch_model"
# nnx module names that differ from diffusers' (applied to the dotted key, in order).
UNET_RENAMES = (
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
)


def read_config(path: str) -> dict:
    """The config.json dict of a diffusers model folder."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def unet_name_map(model) -> dict:
    """PyTorch key -> (nnx path, layout kind, PyTorch shape) for a (possibly abstract) UNet."""
    return name_map(model, UNET_RENAMES)


def abstract_unet(config: dict, **options) -> UNet2DConditionModel:
    """The UNet with ShapeDtypeStruct params (no computation). options: dtype,
    attention_impl, remat_policy."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), **options))


def load_unet(path: str, *, dtype=jnp.float32, variant: str | None = None,
              attention_impl: str = "auto", remat_policy: str | None = None
              ) -> UNet2DConditionModel:
    """UNet from a diffusers model folder; float32 params, `dtype` compute."""
    config = read_config(path)
    model = abstract_unet(config, dtype=dtype, attention_impl=attention_impl,
                          remat_policy=remat_policy)
    weights = find_weights(path, [WEIGHTS_STEM], variant)
    return fill_from_torch(model, read_safetensors(weights), UNET_RENAMES, weights)


def save_unet(model: UNet2DConditionModel, path: str) -> None:
    """Write `path/config.json` + `path/diffusion_pytorch_model.safetensors` (float32)."""
    os.makedirs(path, exist_ok=True)
    config = json.loads(model.config.raw_json)
    config["_class_name"] = "UNet2DConditionModel"
    config.setdefault("_diffusers_version", "0.30.0")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(export_to_torch(model, UNET_RENAMES),
                      os.path.join(path, WEIGHTS_STEM + ".safetensors"))
