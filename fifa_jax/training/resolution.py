"""The training resolution against the base model, checked before any stage runs.

`encode.resolution` pixels become resolution / f latents (f = the VAE's factor, 2 per level
after the first of its `block_out_channels`), and the UNet halves the latents once per level
after its first: the latent side must be a multiple of 2^(levels - 1). Read from the models'
`config.json` files alone (no weights), so a size the UNet cannot take stops the run in one
line before encode spends hours on it. A base model whose files are not there yet is left to
the stages (they name what is missing).
"""
from __future__ import annotations

import os

from fifa_jax import files
from fifa_jax.errors import ConfigError, InputError


def size_multiple(vae_levels: int, unet_levels: int) -> tuple[int, int]:
    """(VAE factor, the multiple every image side must be) for a VAE and a UNet of these
    numbers of `block_out_channels` levels: factor 2^(vae_levels - 1), multiple factor x
    2^(unet_levels - 1)."""
    factor = 2 ** (vae_levels - 1)
    return factor, factor * 2 ** (unet_levels - 1)


def neighbours(size: int, multiple: int) -> tuple[int, int]:
    """The multiples of `multiple` just below (or, below one multiple, the first) and above
    `size`, for the error messages."""
    lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
    return lower or upper, upper


def _levels(folder: str) -> int | None:
    """len(block_out_channels) of `folder/config.json`, or None when unreadable (the stages
    then name what is wrong with the file)."""
    try:
        return len(files.read_json(os.path.join(folder, "config.json"))["block_out_channels"])
    except (OSError, InputError, KeyError, TypeError):
        return None


def _base_folder(name: str) -> str:
    if name == "demo":
        from fifa_jax.demo import shipped
        return os.path.join(shipped.ROOT, "base")
    return name


def check(config) -> None:
    """ConfigError naming `encode.resolution` when the base model cannot take it."""
    ec = config.get("encode")
    if ec is None or not ec.get("base_model") or not ec.get("resolution"):
        return
    res = int(ec.resolution)
    base = _base_folder(ec.base_model)
    vae_levels = _levels(ec.get("vae_path") or os.path.join(base, "vae"))
    tc = config.get("train")
    unet_base = _base_folder((tc.get("base_model") if tc is not None else "") or ec.base_model)
    unet_levels = _levels(os.path.join(unet_base, "unet"))
    if vae_levels is None or unet_levels is None:
        return
    factor, multiple = size_multiple(vae_levels, unet_levels)
    if res % multiple:
        lower, upper = neighbours(res, multiple)
        raise ConfigError(
            f"config key 'encode.resolution' = {res} does not fit the base model: its VAE "
            f"(factor {factor}) and UNet ({unet_levels} levels) need a multiple of {multiple} "
            f"({res} gives {res / factor:g} x {res / factor:g} latents); use "
            f"{lower} or {upper}")
