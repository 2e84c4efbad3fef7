"""Decoder-only LM configuration read from a transformers `config.json`.

Families: `llama`, `qwen2`, `gemma2`, `gemma3_text` (and `gemma3`, whose `text_config` is used).
Both the transformers 5 form (`rope_parameters`, `layer_types`) and the older form
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`) are read.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from fifa_jax.files import read_json

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: base `theta`, `rope_type` and its scaling keys."""
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Everything the Flax decoder needs; built by `from_hf_dict` / `load_lm_config`."""
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str
    tie_embeddings: bool
    qkv_bias: bool              # bias on q/k/v projections (Qwen2; Llama `attention_bias`)
    o_bias: bool                # bias on the output projection (Llama `attention_bias`)
    mlp_bias: bool              # Llama `mlp_bias`
    norm_plus_one: bool         # Gemma RMSNorm: x_hat * (1 + w)
    embed_scale: bool           # Gemma: embeddings * sqrt(hidden_size)
    sandwich_norms: bool        # Gemma2/3: post-attention, pre/post feed-forward norms
    qk_norm: bool               # Gemma3: RMSNorm over head_dim on q and k
    attn_scale: float           # logits scale (1/sqrt(head_dim) or query_pre_attn_scalar**-0.5)
    attn_softcap: float | None  # Gemma2: cap * tanh(logits / cap)
    final_softcap: float | None
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope: tuple[tuple[str, RopeConfig], ...]   # layer type -> rope; a tuple so it is hashable
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    def rope_for(self, layer_type: str) -> RopeConfig:
        return dict(self.rope)[layer_type]

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.num_layers * per_layer + self.vocab_size * d + head


def _rope_from_dict(d: dict, default_theta: float, max_pos: int, where: str) -> RopeConfig:
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} not supported; supported {ROPE_TYPES}")
    theta = float(d.get("rope_theta", default_theta))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in d:
        raise ValueError(f"{where}: rope_type {rope_type!r} needs 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(d["factor"]))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in d:
            raise ValueError(f"{where}: rope_type 'llama3' needs {key!r}")
    return RopeConfig(theta=theta, rope_type="llama3", factor=float(d["factor"]),
                      low_freq_factor=float(d["low_freq_factor"]),
                      high_freq_factor=float(d["high_freq_factor"]),
                      original_max_position_embeddings=int(
                          d.get("original_max_position_embeddings", max_pos)))


def _rope_table(c: dict, family: str, types: set[str], where: str) -> dict[str, RopeConfig]:
    max_pos = int(c.get("max_position_embeddings", 8192))
    params = c.get("rope_parameters")
    nested = isinstance(params, dict) and any(k in (FULL, SLIDING) for k in params)
    if family == "gemma3_text":
        g_theta = float(c.get("rope_theta", 1_000_000.0))
        l_theta = float(c.get("rope_local_base_freq", 10_000.0))
        if nested:
            full = dict(params.get(FULL) or {})
            local = dict(params.get(SLIDING) or {})
        else:
            full = dict(params or c.get("rope_scaling") or {})
            local = {}
        return {FULL: _rope_from_dict(full, g_theta, max_pos, where),
                SLIDING: _rope_from_dict(local, l_theta, max_pos, where)}
    if nested:
        return {t: _rope_from_dict(dict(params.get(t) or {}), float(c.get("rope_theta", 10_000.0)),
                                   max_pos, where) for t in types}
    d = dict(params or {})
    if not params and c.get("rope_scaling"):
        d = dict(c["rope_scaling"])
    d.setdefault("rope_theta", c.get("rope_theta", 10_000.0))
    rope = _rope_from_dict(d, 10_000.0, max_pos, where)
    return {t: rope for t in types}


def _layer_types(c: dict, family: str, n: int) -> tuple[str, ...]:
    if c.get("layer_types"):
        types = tuple(c["layer_types"])
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
        return types
    if family == "gemma2":
        return tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n))
    if family == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6))
        return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    if family == "qwen2" and c.get("use_sliding_window"):
        start = int(c.get("max_window_layers", n))
        return tuple(SLIDING if i >= start else FULL for i in range(n))
    if family == "llama" and c.get("sliding_window"):   # Mistral-style: every layer windowed
        return tuple(SLIDING for _ in range(n))
    return tuple(FULL for _ in range(n))


def from_hf_dict(c: dict, where: str = "config.json") -> LMConfig:
    """`LMConfig` from a transformers config dict (`where` names the file in errors)."""
    family = c.get("model_type")
    if family == "gemma3" and "text_config" in c:
        text = dict(c["text_config"])
        text.setdefault("model_type", "gemma3_text")
        return from_hf_dict(text, where + ":text_config")
    if family == "mistral":
        family = "llama"
    if family not in FAMILIES:
        raise ValueError(f"{where}: model_type {family!r} not supported; supported {FAMILIES}")
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        n = int(c["num_hidden_layers"])
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or hidden // heads)
        vocab, inter = int(c["vocab_size"]), int(c["intermediate_size"])
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads {heads} not a multiple of "
                         f"num_key_value_heads {kv}")
    gemma = family in ("gemma2", "gemma3_text")
    act = c.get("hidden_activation") or c.get("hidden_act") or (
        "gelu_pytorch_tanh" if gemma else "silu")
    if act == "swish":
        act = "silu"
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: activation {act!r} not supported; supported {ACTIVATIONS}")
    types = _layer_types(c, family, n)
    bad = set(types) - {FULL, SLIDING}
    if bad:
        raise ValueError(f"{where}: unknown layer_types {sorted(bad)}")
    window = c.get("sliding_window")
    if SLIDING in types and not window:
        raise ValueError(f"{where}: sliding layers but no sliding_window")
    attn_bias = bool(c.get("attention_bias", False))
    scale = (float(c.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma
             else 1.0 / math.sqrt(head_dim))
    eos = c.get("eos_token_id")
    eos = () if eos is None else tuple(np.atleast_1d(eos).astype(int).tolist())
    return LMConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), activation=act,
        tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qkv_bias=attn_bias or family == "qwen2", o_bias=attn_bias,
        mlp_bias=bool(c.get("mlp_bias", False)), norm_plus_one=gemma, embed_scale=gemma,
        sandwich_norms=gemma, qk_norm=family == "gemma3_text", attn_scale=scale,
        attn_softcap=(c.get("attn_logit_softcapping") if gemma else None),
        final_softcap=(c.get("final_logit_softcapping") if gemma else None),
        layer_types=types, sliding_window=int(window) if SLIDING in types else None,
        rope=tuple(sorted(_rope_table(c, family, set(types), where).items())),
        pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos)


def load_lm_config(path: str) -> LMConfig:
    """`LMConfig` from `path/config.json` (or `path` itself when it is a file)."""
    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path}")
    return from_hf_dict(read_json(file, "a model config"), file)
