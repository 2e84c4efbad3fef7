"""Compute dtypes as configs spell them: the one name -> jnp dtype map.

    DTYPES["bfloat16"] -> jnp.bfloat16     ("float32", "bfloat16", "float16")
    HALF_OR_FULL = ("float32", "bfloat16")  the choices of the keys that take no float16
    compute_dtype(name or dtype, key, choices) -> the jnp dtype (ValueError naming the key)
"""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
HALF_OR_FULL = ("float32", "bfloat16")


def compute_dtype(dtype, key: str = "dtype", choices=HALF_OR_FULL):
    """The jnp dtype of a name in `choices` (a dtype is returned as it is)."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in choices:
        raise ValueError(f"{key} must be one of {sorted(choices)}, got {dtype!r}")
    return DTYPES[dtype]
