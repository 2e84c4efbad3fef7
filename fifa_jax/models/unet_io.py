"""Load / save the SD UNet in the diffusers folder layout (config.json + safetensors).

`load_unet(path)` builds the model abstractly (no eager init), then fills it from
`diffusion_pytorch_model[.variant].safetensors` or its sharded `.index.json`, strictly, one
tensor at a time; with `mesh=` each parameter goes straight into its NamedSharding
(`parallel.param_sharding`). `save_unet(model, path)` writes the original config and
PyTorch-named float32 safetensors (sharded params are gathered; several hosts: process 0).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.diffusers_io import fill_from_folder, read_config, save_to_folder
from fifa_jax.models.torch_names import name_map
from fifa_jax.models.unet import UNet2DConditionModel

# nnx module names that differ from diffusers' (applied to the dotted key, in order).
UNET_RENAMES = (
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
)


def unet_name_map(model) -> dict:
    """PyTorch key -> (nnx path, layout kind, PyTorch shape) for a (possibly abstract) UNet."""
    return name_map(model, UNET_RENAMES)


def abstract_unet(config: dict, **options) -> UNet2DConditionModel:
    """The UNet with ShapeDtypeStruct params (no computation). options: dtype,
    attention_impl, remat_policy."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0), **options))


def load_unet(path: str, *, dtype=jnp.float32, variant: str | None = None,
              attention_impl: str = "auto", remat_policy: str | None = None,
              mesh=None, rules=None) -> UNet2DConditionModel:
    """UNet from a diffusers model folder; float32 params, `dtype` compute.

    mesh: None (params on the default device) or a Mesh with an "fsdp" axis: params placed by
    `param_sharding.param_shardings(state, mesh, rules=rules)` as they are read. rules: (regex,
    tactic) pairs (None: DEFAULT_RULES; from a config: `param_sharding.rules_from_config`).
    """
    model = abstract_unet(read_config(path), dtype=dtype, attention_impl=attention_impl,
                          remat_policy=remat_policy)
    return fill_from_folder(model, path, UNET_RENAMES, variant, mesh=mesh, rules=rules)


def save_unet(model: UNet2DConditionModel, path: str) -> None:
    """Write `path/config.json` + `path/diffusion_pytorch_model.safetensors` (float32).
    Params may be sharded; on several hosts every process calls this and process 0 writes."""
    save_to_folder(model, path, "UNet2DConditionModel", UNET_RENAMES)
