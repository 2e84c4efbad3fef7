"""The UNet's spatial transformer: Transformer2DModel and BasicTransformerBlock.

Attention goes through `fifa_jax.models.attention.dot_product_attention(impl=...)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.attention import dot_product_attention
from fifa_jax.models.layers import Conv2D, GroupNorm, KeyGen, LayerNorm, Linear, gelu


class Attention(nnx.Module):
    """Multi-head (self or cross) attention, heads x head_dim = inner.

    x: (B, T, query_dim), context: (B, S, context_dim) or None (self) -> (B, T, query_dim).
    to_q/k/v without bias (diffusers' default) unless `qkv_bias`; to_out with bias.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, *,
                 context_dim: int | None = None, qkv_bias: bool = False,
                 upcast: bool = False, impl: str = "auto", dtype=jnp.float32, keys: KeyGen):
        inner = heads * head_dim
        kv_dim = context_dim if context_dim is not None else query_dim
        self.heads, self.head_dim, self.impl, self.upcast, self.dtype = (
            heads, head_dim, impl, upcast, dtype)
        self.to_q = Linear(query_dim, inner, use_bias=qkv_bias, keys=keys, dtype=dtype)
        self.to_k = Linear(kv_dim, inner, use_bias=qkv_bias, keys=keys, dtype=dtype)
        self.to_v = Linear(kv_dim, inner, use_bias=qkv_bias, keys=keys, dtype=dtype)
        self.to_out = Linear(inner, query_dim, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, t, _ = x.shape
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        impl = self.impl
        if self.upcast and q.dtype == jnp.float16:
            # diffusers' upcast_attention guards fp16 overflow; bf16 has float32's range.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
            impl = "xla"
        o = dot_product_attention(q, k, v, impl=impl).astype(self.dtype)
        return self.to_out(o.reshape(b, t, self.heads * self.head_dim))


class FeedForward(nnx.Module):
    """GEGLU feed-forward: (h, g) = proj(x) split in two; out(h * gelu(g)). Inner = 4 dim."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, keys: KeyGen):
        inner = dim * mult
        self.proj = Linear(dim, 2 * inner, keys=keys, dtype=dtype)
        self.out = Linear(inner, dim, keys=keys, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, g = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(h * gelu(g))


class BasicTransformerBlock(nnx.Module):
    """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x). (B, T, D)."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int,
                 upcast: bool, impl: str, norm_eps: float = 1e-5, dtype=jnp.float32,
                 keys: KeyGen):
        kw = dict(upcast=upcast, impl=impl, dtype=dtype, keys=keys)
        self.norm1 = LayerNorm(dim, norm_eps, dtype=dtype)
        self.attn1 = Attention(dim, heads, head_dim, **kw)
        self.norm2 = LayerNorm(dim, norm_eps, dtype=dtype)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, **kw)
        self.norm3 = LayerNorm(dim, norm_eps, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, keys=keys)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, residual.

    x: (B, H, W, C), context: (B, S, context_dim) -> (B, H, W, C).
    """

    def __init__(self, channels: int, heads: int, *, num_layers: int, context_dim: int,
                 groups: int, use_linear_projection: bool, upcast: bool, impl: str,
                 dtype=jnp.float32, keys: KeyGen):
        if channels % heads:
            raise ValueError(f"{channels} channels not divisible by {heads} attention heads")
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear_proj = use_linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(channels, inner, keys=keys, dtype=dtype)
            self.proj_out = Linear(inner, channels, keys=keys, dtype=dtype)
        else:
            self.proj_in = Conv2D(channels, inner, 1, keys=keys, dtype=dtype)
            self.proj_out = Conv2D(inner, channels, 1, keys=keys, dtype=dtype)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, context_dim=context_dim,
                                  upcast=upcast, impl=impl, dtype=dtype, keys=keys)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm(x)
        if self.linear_proj:
            h = self.proj_in(h.reshape(b, hh * ww, c))
        else:
            h = self.proj_in(h)
            h = h.reshape(b, hh * ww, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h).reshape(b, hh, ww, c)
        else:
            h = self.proj_out(h.reshape(b, hh, ww, h.shape[-1]))
        return h + x
