"""Load / save AutoencoderKL in the diffusers folder layout (config.json + safetensors)."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.safetensors_io import find_weights, read_safetensors, write_safetensors
from fifa_jax.models.torch_names import export_to_torch, fill_from_torch, name_map
from fifa_jax.models.unet_io import WEIGHTS_STEM, read_config
from fifa_jax.models.vae import AutoencoderKL

VAE_RENAMES = ((r"\.to_out\.", ".to_out.0."),)


def vae_name_map(model) -> dict:
    """PyTorch key -> (nnx path, layout kind, PyTorch shape) for a (possibly abstract) VAE."""
    return name_map(model, VAE_RENAMES)


def abstract_vae(config: dict, **options) -> AutoencoderKL:
    """The VAE with ShapeDtypeStruct params. options: dtype, attention_impl."""
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), **options))


def load_vae(path: str, *, dtype=jnp.float32, variant: str | None = None,
             attention_impl: str = "auto") -> AutoencoderKL:
    """AutoencoderKL from a diffusers model folder; float32 params, `dtype` compute."""
    model = abstract_vae(read_config(path), dtype=dtype, attention_impl=attention_impl)
    weights = find_weights(path, [WEIGHTS_STEM], variant)
    return fill_from_torch(model, read_safetensors(weights), VAE_RENAMES, weights)


def save_vae(model: AutoencoderKL, path: str) -> None:
    """Write `path/config.json` + `path/diffusion_pytorch_model.safetensors` (float32)."""
    os.makedirs(path, exist_ok=True)
    config = json.loads(model.config.raw_json)
    config["_class_name"] = "AutoencoderKL"
    config.setdefault("_diffusers_version", "0.30.0")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_safetensors(export_to_torch(model, VAE_RENAMES),
                      os.path.join(path, WEIGHTS_STEM + ".safetensors"))
