"""Sinusoidal timestep features, the timestep MLP of the SD UNet, and the pooled-text embedding
(`addition_embed_type="text"`) that adds the prompt to the timestep embedding."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.layers import KeyGen, LayerNorm, Linear, activation


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


class AttentionPooling(nnx.Module):
    """(B, L, D) tokens -> (B, D): one query token, the tokens' mean plus a learnt offset
    (`positional_embedding` (1, D)), attends over [query, tokens] with `num_heads` heads."""

    def __init__(self, num_heads: int, dim: int, *, dtype=jnp.float32, keys: KeyGen):
        self.num_heads, self.dtype = num_heads, dtype
        self.positional_embedding = nnx.Param(
            jax.random.normal(keys(), (1, dim), jnp.float32) / math.sqrt(dim))
        self.q_proj = Linear(dim, dim, keys=keys, dtype=dtype)
        self.k_proj = Linear(dim, dim, keys=keys, dtype=dtype)
        self.v_proj = Linear(dim, dim, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        query = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
        tokens = jnp.concatenate([query, x], axis=1)                      # (B, L + 1, D)
        q = self.q_proj(query).reshape(b, 1, h, d // h)
        k = self.k_proj(tokens).reshape(b, n + 1, h, d // h)
        v = self.v_proj(tokens).reshape(b, n + 1, h, d // h)
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // h)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, d)


class TextTimeEmbedding(nnx.Module):
    """LayerNorm -> AttentionPooling -> Linear -> LayerNorm: (B, L, D) context -> (B, T), added
    to the timestep embedding (diffusers' `addition_embed_type="text"`)."""

    def __init__(self, dim: int, time_embed_dim: int, num_heads: int, *, dtype=jnp.float32,
                 keys: KeyGen):
        self.norm1 = LayerNorm(dim, 1e-5, dtype=dtype)
        self.pool = AttentionPooling(num_heads, dim, dtype=dtype, keys=keys)
        self.proj = Linear(dim, time_embed_dim, keys=keys, dtype=dtype)
        self.norm2 = LayerNorm(time_embed_dim, 1e-5, dtype=dtype)

    def __call__(self, context: jax.Array) -> jax.Array:
        return self.norm2(self.proj(self.pool(self.norm1(context))))
