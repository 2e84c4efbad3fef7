"""BERT-family encoder (transformers `BertModel` layout) in Flax NNX, for sentence embeddings.

Post-LayerNorm encoder: embeddings (word + absolute position + token type, LayerNorm), then
layers of self-attention and a GELU MLP, each followed by a residual LayerNorm. `__call__`
returns the last hidden states (B, T, D); `mean_pool` gives sentence-transformers' mean pooling.

`load_bert(path)` reads `config.json` + `model.safetensors` strictly: every model key must be
present with its shape; the only checkpoint keys tolerated beyond the model are the pooler
(`pooler.*`, unused by mean pooling), pre-training heads (`cls.*`) and the `position_ids`
buffer. A `bert.` prefix (BertFor* checkpoints) is stripped.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fifa_jax.files import read_json
from fifa_jax.models.attention import dot_product_attention
from fifa_jax.models.safetensors_io import (CheckpointMismatchError, check_keys, find_weights,
                                            linear_to_flax, read_safetensors)

_IGNORED_PREFIXES = ("pooler.", "cls.")
_IGNORED_KEYS = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "BertConfig":
        kind = d.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"{source}: position_embedding_type {kind!r} is not supported "
                             "(only 'absolute')")
        if d.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {d.get('hidden_act')!r} not in "
                             f"{sorted(_ACTIVATIONS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value = lin(d, d), lin(d, d), lin(d, d)
        self.attn_out = lin(d, d)
        self.attn_norm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.intermediate = lin(d, cfg.intermediate_size)
        self.output = lin(cfg.intermediate_size, d)
        self.out_norm = nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.act = cfg.hidden_act

    def __call__(self, x, mask, impl: str):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)  # noqa: E731
        a = dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                  mask=mask, impl=impl).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(a))
        h = self.output(_ACTIVATIONS[self.act](self.intermediate(x)))
        return self.out_norm(x + h)


class BertModel(nnx.Module):
    """BERT encoder: (B, T) int ids -> (B, T, D) last hidden states."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.config = cfg
        self.word_embeddings = nnx.Embed(cfg.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, d, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.dtype = dtype

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 impl: str = "xla"):
        """input_ids, attention_mask, token_type_ids: (B, T) -> (B, T, D) in `dtype`."""
        b, t = input_ids.shape
        if t > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {t} > max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]
             + self.token_type_embeddings(token_type_ids))
        x = self.embed_norm(x.astype(self.dtype))
        mask = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, mask, impl)
        return x


def mean_pool(hidden, attention_mask, normalize: bool = True):
    """(B, T, D), (B, T) -> (B, D) float32 mean over unmasked tokens, optionally L2-normalised.

    As sentence-transformers: sum / max(count, 1e-9) and x / max(||x||, 1e-12).
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    pooled = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def torch_to_flax_map(cfg: BertConfig) -> dict[str, tuple[tuple, str]]:
    """PyTorch key -> (path in the NNX pure state, transform: 'linear' | 'copy')."""
    m = {
        "embeddings.word_embeddings.weight": (("word_embeddings", "embedding"), "copy"),
        "embeddings.position_embeddings.weight": (("position_embeddings", "embedding"), "copy"),
        "embeddings.token_type_embeddings.weight": (("token_type_embeddings", "embedding"),
                                                    "copy"),
        "embeddings.LayerNorm.weight": (("embed_norm", "scale"), "copy"),
        "embeddings.LayerNorm.bias": (("embed_norm", "bias"), "copy"),
    }
    names = {"attention.self.query": "query", "attention.self.key": "key",
             "attention.self.value": "value", "attention.output.dense": "attn_out",
             "intermediate.dense": "intermediate", "output.dense": "output"}
    norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "out_norm"}
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for tk, fk in names.items():
            m[pre + tk + ".weight"] = (("layers", i, fk, "kernel"), "linear")
            m[pre + tk + ".bias"] = (("layers", i, fk, "bias"), "copy")
        for tk, fk in norms.items():
            m[pre + tk + ".weight"] = (("layers", i, fk, "scale"), "copy")
            m[pre + tk + ".bias"] = (("layers", i, fk, "bias"), "copy")
    return m


def _expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, d),
              "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, d),
              "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
              "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes[pre + n + ".weight"], shapes[pre + n + ".bias"] = (d, d), (d,)
        shapes[pre + "intermediate.dense.weight"] = (f, d)
        shapes[pre + "intermediate.dense.bias"] = (f,)
        shapes[pre + "output.dense.weight"], shapes[pre + "output.dense.bias"] = (d, f), (d,)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[pre + n + ".weight"], shapes[pre + n + ".bias"] = (d,), (d,)
    return shapes


def _set_path(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    if path[-1] not in tree:
        raise KeyError(f"no parameter at {path}")
    tree[path[-1]] = value


def from_torch_state(cfg: BertConfig, tensors: dict[str, np.ndarray], source: str,
                     dtype=jnp.float32) -> BertModel:
    """Build a BertModel from PyTorch-layout tensors (strict; see module docstring)."""
    if tensors and all(k.startswith("bert.") for k in tensors if not k.startswith("cls.")):
        tensors = {k[len("bert."):] if k.startswith("bert.") else k: v
                   for k, v in tensors.items()}
    kept = {k: v for k, v in tensors.items()
            if not k.startswith(_IGNORED_PREFIXES) and k not in _IGNORED_KEYS}
    check_keys(_expected_shapes(cfg), kept, source)
    model = nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for key, (path, how) in torch_to_flax_map(cfg).items():
        arr = np.asarray(kept[key], np.float32)
        _set_path(pure, path, jnp.asarray(linear_to_flax(arr) if how == "linear" else arr))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_bert(path: str, dtype=jnp.float32) -> BertModel:
    """Load a transformers BertModel folder (`config.json` + safetensors weights)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"no config.json in {path}")
    raw = read_json(cfg_file, "a model config")
    if raw.get("model_type", "bert") not in ("bert",):
        raise CheckpointMismatchError(f"{cfg_file}: model_type {raw.get('model_type')!r} is "
                                      "not a BERT encoder")
    cfg = BertConfig.from_dict(raw, cfg_file)
    weights = find_weights(path, ["model"])
    return from_torch_state(cfg, read_safetensors(weights), weights, dtype=dtype)
