"""Load / save AutoencoderKL in the diffusers folder layout (config.json + safetensors)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.diffusers_io import fill_from_folder, read_config, save_to_folder
from fifa_jax.models.torch_names import name_map
from fifa_jax.models.vae import AutoencoderKL

VAE_RENAMES = ((r"\.to_out\.", ".to_out.0."),)


def vae_name_map(model) -> dict:
    """PyTorch key -> (nnx path, layout kind, PyTorch shape) for a (possibly abstract) VAE."""
    return name_map(model, VAE_RENAMES)


def abstract_vae(config: dict, **options) -> AutoencoderKL:
    """The VAE with ShapeDtypeStruct params. options: dtype, attention_impl."""
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), **options))


def load_vae(path: str, *, dtype=jnp.float32, variant: str | None = None,
             attention_impl: str = "auto", mesh=None, rules=None) -> AutoencoderKL:
    """AutoencoderKL from a diffusers model folder; float32 params, `dtype` compute.
    mesh / rules: as `unet_io.load_unet` (None: params on the default device)."""
    model = abstract_vae(read_config(path), dtype=dtype, attention_impl=attention_impl)
    return fill_from_folder(model, path, VAE_RENAMES, variant, mesh=mesh, rules=rules)


def save_vae(model: AutoencoderKL, path: str) -> None:
    """Write `path/config.json` + `path/diffusion_pytorch_model.safetensors` (float32).
    Params may be sharded; on several hosts every process calls this and process 0 writes."""
    save_to_folder(model, path, "AutoencoderKL", VAE_RENAMES)
