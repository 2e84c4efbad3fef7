"""Flax NNX decoder-only LM for the Llama, Qwen2, Gemma2 and Gemma3 (text) families.

    model = llm_io.load_llm(path, dtype=jnp.bfloat16, mesh=mesh)   # transformers folder
    hidden = model(input_ids, attention_mask)               # (B, T, D), after the final norm
    logits = model.logits(hidden[:, -1])                    # (B, V) float32, soft-capped

Padding may be left or right: `attention_mask` (B, T) marks real tokens, positions are
`cumsum(mask) - 1`, and padded keys are never attended. Parameters are float32; `dtype` is the
compute dtype. Loading and sharding live in `llm_io`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.llm_config import LMConfig, load_lm_config  # noqa: F401 (re-export)
from fifa_jax.models.llm_layers import DecoderLayer, RMSNorm, rope_cos_sin, rope_inv_freq


def positions_from_mask(attention_mask):
    """(B, T) 0/1 mask -> (B, T) int32 positions: 0.. over real tokens, 0 on left pads."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class LMBackbone(nnx.Module):
    """Embeddings, decoder layers and the final norm (transformers' `model.*`)."""

    def __init__(self, cfg: LMConfig, *, dtype, attn_impl: str, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=jnp.float32, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, t, dtype=dtype, attn_impl=attn_impl, rngs=rngs)
                                for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)


class DecoderLM(nnx.Module):
    """Causal LM; see the module docstring for the call convention."""

    def __init__(self, cfg: LMConfig, *, dtype=jnp.float32, attn_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.model = LMBackbone(cfg, dtype=dtype, attn_impl=attn_impl, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False,
                                      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """input_ids (B, T) int, attention_mask (B, T) -> hidden (B, T, D) in the compute dtype."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        key_mask = attention_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = self.model.embed_tokens(input_ids)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
        rope = {t: rope_cos_sin(positions, rope_inv_freq(self.cfg.rope_for(t), self.cfg.head_dim),
                                self.dtype)
                for t in set(self.cfg.layer_types)}
        for layer in self.model.layers:
            cos, sin = rope[layer.layer_type]
            x = layer(x, cos, sin, key_mask)
        return self.model.norm(x)

    def logits(self, hidden):
        """hidden (..., D) -> float32 logits (..., V), with Gemma2's final soft-capping.

        Inputs in the compute dtype, accumulated and returned in float32: bfloat16 logits
        would be rounded to 1/16..1/8 at the usual magnitudes (8..32), several percent of
        every next-token probability the judge reads."""
        h = hidden.astype(self.dtype)
        if self.cfg.tie_embeddings:
            emb = self.model.embed_tokens.embedding[...].astype(self.dtype)
            out = jnp.einsum("...d,vd->...v", h, emb, preferred_element_type=jnp.float32)
        else:
            kernel = self.lm_head.kernel[...].astype(self.dtype)
            out = jnp.einsum("...d,dv->...v", h, kernel, preferred_element_type=jnp.float32)
        out = out.astype(jnp.float32)
        cap = self.cfg.final_softcap
        if cap is not None:
            out = cap * jnp.tanh(out / cap)
        return out


def next_token_logits(model: DecoderLM, input_ids, attention_mask):
    """Logits (B, V) float32 for the token after the last position (left-padded input)."""
    hidden = model(input_ids, attention_mask)
    return model.logits(hidden[:, -1])
