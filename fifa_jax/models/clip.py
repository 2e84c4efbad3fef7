"""CLIP in Flax NNX: text tower, vision tower, and the dual model (PickScore is one).

Attribute names follow transformers' PyTorch modules one to one (`embeddings.token_embedding`,
`encoder.layers[i].self_attn.q_proj`, `pre_layrnorm` (sic), ...), so `clip_io` maps weights by
an explicit leaf-name table. Parameters are float32; `dtype` is the compute dtype.

    CLIPTextModel(config)(input_ids (B, L), attention_mask=None, output_hidden_states=False)
        -> TextOutput(last_hidden_state (B, L, D), pooled (B, D), hidden_states)
    CLIPTextModelWithProjection(...)(...)  -> TextOutput with text_embeds (B, P)
    CLIPVisionModel(config)(pixel_values (B, 3, H, W))
        -> VisionOutput(last_hidden_state (B, 1 + N, D), pooled (B, D), hidden_states)
    CLIPVisionModelWithProjection(...)(...) -> VisionOutput with image_embeds (B, P)
    CLIPModel(config).get_text_features / get_image_features / logits / score

How the Stable Diffusion pipelines read the text tower (as in diffusers):
  * SD1.x: `last_hidden_state` (12 layers, final layer norm applied).
  * SD2.x: `last_hidden_state` too: the diffusers checkpoint already keeps only 23 of OpenCLIP's
    24 layers, so the "penultimate layer" is the last one here, and the final norm is applied.
  * SDXL: `hidden_states[-2]` of both encoders (penultimate layer, *no* final layer norm),
    concatenated on the feature axis; the pooled condition is encoder 2's `text_embeds`.

In hot loops split once and jit over the state (NNX graph traversal is Python work):

    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).last_hidden_state)
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.models.attention import dot_product_attention
from fifa_jax.models.clip_config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig


class TextOutput(NamedTuple):
    """last_hidden_state (B, L, D) after the final layer norm; pooled (B, D) at the EOS token;
    hidden_states: tuple of num_layers + 1 arrays (B, L, D) (embeddings, then each layer's
    output, *before* the final layer norm) or None; text_embeds (B, P) projected pooled output,
    only from CLIPTextModelWithProjection."""
    last_hidden_state: jax.Array
    pooled: jax.Array
    hidden_states: Optional[tuple] = None
    text_embeds: Optional[jax.Array] = None


class VisionOutput(NamedTuple):
    """last_hidden_state (B, 1 + N, D) (no post norm); pooled (B, D) = post_layernorm(CLS);
    hidden_states as for text (pre-layernormed embeddings first); image_embeds (B, P), only
    from CLIPVisionModelWithProjection."""
    last_hidden_state: jax.Array
    pooled: jax.Array
    hidden_states: Optional[tuple] = None
    image_embeds: Optional[jax.Array] = None


def activation(name: str, x: jax.Array) -> jax.Array:
    """transformers' ACT2FN by name: quick_gelu = x * sigmoid(1.702 x), gelu = exact (erf)."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("silu", "swish"):
        return jax.nn.silu(x)
    raise ValueError(f"unsupported hidden_act {name!r}")


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B,) index of the pooled token, as transformers' CLIPTextModel picks it.

    eos_token_id == 2 (configs written before transformers PR #24773, e.g. every SD text
    encoder): the position of the largest id (the EOS token has the largest id in CLIP's vocab).
    Otherwise: the first position whose id equals eos_token_id (0 if there is none).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


_ABSTRACT = contextvars.ContextVar("fifa_jax_clip_abstract_init", default=False)


def _shape_only(key, shape, dtype=jnp.float32):
    del key
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


@contextlib.contextmanager
def abstract_init():
    """Build CLIP modules with ShapeDtypeStruct params: no RNG draws, no allocation.

    Faster than `nnx.eval_shape` for deep models (tracing the init of a 32-layer tower costs
    seconds); the result has the same structure as nnx.eval_shape's.
    """
    token = _ABSTRACT.set(True)
    try:
        yield
    finally:
        _ABSTRACT.reset(token)


def _inits(*names: str) -> dict:
    """{name: shape-only initializer} inside abstract_init(), else {} (flax defaults)."""
    return {n: _shape_only for n in names} if _ABSTRACT.get() else {}


def _linear(din: int, dout: int, *, dtype, rngs: nnx.Rngs, use_bias: bool = True):
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      **_inits("kernel_init", "bias_init"))


def _embed(num: int, dim: int, *, dtype, rngs: nnx.Rngs):
    return nnx.Embed(num, dim, dtype=dtype, rngs=rngs, **_inits("embedding_init"))


def _layer_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance as in PyTorch: CLIP's residual stream has large outliers.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs,
                         **_inits("scale_init", "bias_init"))


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim: int, heads: int, *, dtype, attention_impl: str, rngs: nnx.Rngs):
        self.num_heads = heads
        self.attention_impl = attention_impl
        self.q_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mask=None, is_causal: bool = False):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
        o = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                  split(self.v_proj(x)), mask=mask, is_causal=is_causal,
                                  impl=self.attention_impl)
        return self.out_proj(o.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(activation(self.act, self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg, *, dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.layer_norm1 = _layer_norm(d, cfg.layer_norm_eps, dtype, rngs)
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, dtype=dtype,
                                       attention_impl=attention_impl, rngs=rngs)
        self.layer_norm2 = _layer_norm(d, cfg.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, mask=None, is_causal: bool = False):
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, dtype, attention_impl: str, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, attention_impl=attention_impl,
                                                 rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, *, mask=None, is_causal: bool = False,
                 output_hidden_states: bool = False):
        """x (B, T, D) -> (last (B, T, D), tuple of num_layers + 1 states or None)."""
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask=mask, is_causal=is_causal)
            if output_hidden_states:
                states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = _embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = _embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            dtype=dtype, rngs=rngs)

    def __call__(self, input_ids):
        length = input_ids.shape[-1]
        pos = self.position_embedding.embedding[...][:length]
        return self.token_embedding(input_ids) + pos.astype(self.token_embedding.dtype or pos.dtype)


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: causal self-attention, final layer norm, EOS pooling.

    Args of __call__:
      input_ids: (B, L) int, L <= max_position_embeddings.
      attention_mask: optional (B, L), 1 = real token, 0 = padding (masks keys only, as in
        transformers; right padding only: a row must start with a real token). With the causal
        mask it changes only the padded positions' states, never the pooled output.
      output_hidden_states: also return every layer's output (static Python bool).
    Returns: TextOutput (see its docstring).
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        mask = None
        if attention_mask is not None:
            # full (B, 1, L, L): cuDNN takes the mask as a bias and needs both sequence axes
            m = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
            mask = jnp.broadcast_to(m, (m.shape[0], 1, input_ids.shape[1], input_ids.shape[1]))
        x = self.embeddings(input_ids)
        x, states = self.encoder(x, mask=mask, is_causal=True,
                                 output_hidden_states=output_hidden_states)
        last = self.final_layer_norm(x)
        pooled = jnp.take_along_axis(
            last, eos_positions(input_ids, self.config.eos_token_id)[:, None, None], axis=1)[:, 0]
        return TextOutput(last, pooled, states)


class CLIPTextModelWithProjection(nnx.Module):
    """CLIPTextModel + `text_projection` (no bias) on the pooled output (SDXL encoder 2)."""

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.config = config
        self.text_model = CLIPTextModel(config, dtype=dtype, attention_impl=attention_impl,
                                        rngs=rngs)
        self.text_projection = _linear(config.hidden_size, config.projection_dim,
                                       use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False):
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooled))


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.image_size = cfg.image_size
        self.num_channels = cfg.num_channels
        self.dtype = dtype
        init = _shape_only if _ABSTRACT.get() else jax.nn.initializers.normal(d ** -0.5)
        self.class_embedding = nnx.Param(init(rngs.params(), (d,), jnp.float32))
        # holds the kernel in the layout clip_io maps; __call__ applies it with patch_embed
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p),
                                        padding="VALID", use_bias=False, dtype=dtype, rngs=rngs,
                                        **_inits("kernel_init"))
        self.position_embedding = _embed(cfg.num_positions, d, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values):
        b, c, h, w = pixel_values.shape
        if c != self.num_channels or h != self.image_size or w != self.image_size:
            raise ValueError(f"pixel_values must be (B, {self.num_channels}, {self.image_size}, "
                             f"{self.image_size}) (NCHW), got {pixel_values.shape}")
        x = patch_embed(jnp.transpose(pixel_values, (0, 2, 3, 1)),
                        self.patch_embedding.kernel[...], self.dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)


def patch_embed(x, kernel, dtype=None):
    """A stride-p, p x p, bias-free VALID convolution as one matmul over flattened patches.

    x (B, H, W, C) NHWC; kernel (p, p, C, D) (flax's conv layout) -> (B, H/p * W/p, D) in
    row-major patch order (what the convolution's output reshaped gives). The same sums as the
    convolution; one GEMM with a 588-long contraction instead of a convolution with 3 input
    channels, which GPU convolution kernels do not map well onto tensor cores (not yet measured
    against the convolution on a GPU: benchmarks/RESULTS.md).
    """
    p, _, c, d = kernel.shape
    b, h, w, _ = x.shape
    gh, gw = h // p, w // p
    x = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, p * p * c)
    k = kernel.reshape(p * p * c, d)
    if dtype is not None:
        x, k = x.astype(dtype), k.astype(dtype)
    return jnp.dot(x, k)


class CLIPVisionModel(nnx.Module):
    """CLIP ViT: patch conv (no bias) + CLS + positions, pre_layrnorm, encoder, post_layernorm.

    __call__(pixel_values (B, C, H, W) float, transformers' NCHW layout, already normalised with
    CLIP's mean/std; H = W = image_size) -> VisionOutput.
    """

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32,
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        self.config = config
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = _layer_norm(d, eps, dtype, rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.post_layernorm = _layer_norm(d, eps, dtype, rngs)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False):
        x = self.pre_layrnorm(self.embeddings(jnp.asarray(pixel_values)))
        x, states = self.encoder(x, output_hidden_states=output_hidden_states)
        return VisionOutput(x, self.post_layernorm(x[:, 0]), states)


class CLIPVisionModelWithProjection(nnx.Module):
    """CLIPVisionModel + `visual_projection` (no bias) on the pooled CLS."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32,
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionModel(config, dtype=dtype, attention_impl=attention_impl,
                                            rngs=rngs)
        self.visual_projection = _linear(config.hidden_size, config.projection_dim,
                                         use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False):
        out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return out._replace(image_embeds=self.visual_projection(out.pooled))


def clip_score(text_features: jax.Array, image_features: jax.Array,
               logit_scale: jax.Array) -> jax.Array:
    """exp(logit_scale) * cos(text_i, image_i) per row, in float32.

    text_features, image_features: (B, P) unnormalised projections; logit_scale: scalar (log).
    Returns (B,). With PickScore's weights this is the PickScore reward.
    """
    t = text_features.astype(jnp.float32)
    i = image_features.astype(jnp.float32)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * jnp.sum(t * i, axis=-1)


class CLIPModel(nnx.Module):
    """The dual CLIP model: both towers, `text_projection`, `visual_projection`, `logit_scale`.

    get_text_features(input_ids (B, L), attention_mask=None) -> (B, P)
    get_image_features(pixel_values (B, 3, H, W)) -> (B, P)
    logits(input_ids (T, L), pixel_values (I, 3, H, W), attention_mask=None)
        -> logits_per_image (I, T) = exp(logit_scale) * cos (transformers' `logits_per_image`)
    score(input_ids (B, L), pixel_values (B, 3, H, W), attention_mask=None) -> (B,)
        row-wise exp(logit_scale) * cos(text_b, image_b) (PickScore reward).

    For preference pairs, compute each prompt's text features once and each image's features
    once, then `clip_score(text_feats[prompt_idx], image_feats, model.logit_scale[...])`.
    Images come preprocessed as CLIP expects (e.g. transformers' CLIPImageProcessor with
    return_tensors="np": resize, centre crop, CLIP mean/std), NCHW float32.
    """

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.config = config
        tc, vc = config.text_config, config.vision_config
        self.text_model = CLIPTextModel(tc, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        self.vision_model = CLIPVisionModel(vc, dtype=dtype, attention_impl=attention_impl,
                                            rngs=rngs)
        self.visual_projection = _linear(vc.hidden_size, config.projection_dim, use_bias=False,
                                         dtype=dtype, rngs=rngs)
        self.text_projection = _linear(tc.hidden_size, config.projection_dim, use_bias=False,
                                       dtype=dtype, rngs=rngs)
        scale = jnp.asarray(config.logit_scale_init_value, jnp.float32)
        self.logit_scale = nnx.Param(_shape_only(None, (), jnp.float32) if _ABSTRACT.get()
                                     else scale)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled)

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def logits(self, input_ids, pixel_values, attention_mask=None):
        t = self.get_text_features(input_ids, attention_mask).astype(jnp.float32)
        i = self.get_image_features(pixel_values).astype(jnp.float32)
        t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
        i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale[...]) * (i @ t.T)

    def score(self, input_ids, pixel_values, attention_mask=None):
        return clip_score(self.get_text_features(input_ids, attention_mask),
                          self.get_image_features(pixel_values), self.logit_scale[...])


AnyCLIP = (CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel,
           CLIPVisionModelWithProjection, CLIPModel)
