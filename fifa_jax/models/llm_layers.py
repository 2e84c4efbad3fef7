"""Building blocks of the decoder-only LM (Llama / Qwen2 / Gemma2 / Gemma3 text).

Module attribute names mirror the transformers module paths (`self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...), so the checkpoint name map in `llm_io` is a rule,
not a table. Arrays are (B, T, D); heads are (B, T, N, H).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.models.attention import dot_product_attention
from fifa_jax.models.llm_config import SLIDING, LMConfig, RopeConfig


class RMSNorm(nnx.Module):
    """y = x / rms(x) * w  (Llama)  or  x / rms(x) * (1 + w)  (Gemma); computed in float32."""

    def __init__(self, dim: int, eps: float, plus_one: bool):
        self.weight = nnx.Param(jnp.zeros((dim,)) if plus_one else jnp.ones((dim,)))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (y * (1.0 + w) if self.plus_one else y * w).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies with `linear` / `llama3` scaling applied."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                / head_dim))
    inv = inv.astype(np.float32)
    if rope.rope_type == "linear":
        return (inv / rope.factor).astype(np.float32)
    if rope.rope_type == "llama3":
        low_wl = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wl = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = ((rope.original_max_position_embeddings / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor))
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions, inv_freq: np.ndarray, dtype):
    """positions (B, T) int -> cos, sin (B, T, 1, H) in `dtype` (angles in float32)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def apply_rope(x, cos, sin):
    """x (B, T, N, H): x * cos + rotate_half(x) * sin (the half-split convention)."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def softcap_attention(q, k, v, *, mask, scale: float, softcap: float, window: int | None):
    """Explicit XLA attention with logit soft-capping, for Gemma2.

    q (B, T, N, H), k/v (B, S, K, H), mask (B, 1, T, S) bool (True = attend). Causal; `window`
    keeps keys with q_idx - kv_idx < window. Softmax in float32. Returns (B, T, N, H).
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    qi = jnp.arange(t)[:, None]
    ki = jnp.arange(s)[None, :]
    allowed = ki <= qi
    if window is not None:
        allowed = allowed & (qi - ki < window)
    allowed = allowed[None, None, None] & mask[:, :, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (and Gemma3 q/k norms)."""

    def __init__(self, cfg: LMConfig, layer_type: str, *, dtype, attn_impl: str,
                 rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.q_proj = nnx.Linear(d, n * h, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(d, k * h, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(d, k * h, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(n * h, d, use_bias=cfg.o_bias, **lin)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.qk_norm = cfg.qk_norm
        self.shape = (n, k, h)
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        self.window = cfg.sliding_window if layer_type == SLIDING else None
        self.attn_impl = attn_impl

    def __call__(self, x, cos, sin, key_mask):
        b, t, _ = x.shape
        n, k, h = self.shape
        q = self.q_proj(x).reshape(b, t, n, h)
        kk = self.k_proj(x).reshape(b, t, k, h)
        v = self.v_proj(x).reshape(b, t, k, h)
        if self.qk_norm:
            q, kk = self.q_norm(q), self.k_norm(kk)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        # Every query also sees itself, so a padded query row is never fully masked (no NaN
        # from any kernel); real queries are unaffected. cuDNN needs the full (B, 1, T, S) form.
        mask = key_mask[:, None, None, :] | jnp.eye(t, dtype=bool)[None, None]
        if self.softcap is not None:
            out = softcap_attention(q, kk, v, mask=mask, scale=self.scale,
                                    softcap=self.softcap, window=self.window)
        else:
            out = dot_product_attention(
                q, kk, v, mask=mask, is_causal=True, scale=self.scale,
                impl=self.attn_impl,
                local_window_size=None if self.window is None else (self.window - 1, 0))
        return self.o_proj(out.reshape(b, t, n * h))


_ACT = {"silu": jax.nn.silu,
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: LMConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **lin)
        self.up_proj = nnx.Linear(d, f, **lin)
        self.down_proj = nnx.Linear(f, d, **lin)
        self.act = _ACT[cfg.activation]

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block; Gemma2/3 add post-attention and pre/post feed-forward norms."""

    def __init__(self, cfg: LMConfig, layer_type: str, *, dtype, attn_impl: str,
                 rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.layer_type = layer_type
        self.self_attn = Attention(cfg, layer_type, dtype=dtype, attn_impl=attn_impl, rngs=rngs)
        self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(self, x, cos, sin, key_mask):
        a = self.self_attn(self.input_layernorm(x), cos, sin, key_mask)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))
