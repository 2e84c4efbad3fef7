"""Sinusoidal timestep features and the timestep MLP of the SD UNet."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.layers import KeyGen, Linear, activation


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of timesteps, float32. t: (N,) -> (N, dim).

    freq_k = exp(-ln(max_period) * k / (dim/2 - freq_shift)), k < dim/2;
    features = [sin(t freq), cos(t freq)], or [cos, sin] when flip_sin_to_cos.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    k = jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2. (N, din) -> (N, dout)."""

    def __init__(self, din: int, dout: int, *, act_fn: str = "silu", dtype=jnp.float32,
                 keys: KeyGen):
        self.act = activation(act_fn)
        self.dtype = dtype
        self.linear_1 = Linear(din, dout, keys=keys, dtype=dtype)
        self.linear_2 = Linear(dout, dout, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x.astype(self.dtype))))
