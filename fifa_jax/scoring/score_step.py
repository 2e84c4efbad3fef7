"""The jitted reward scoring step (margins.py's hot loop), free of host-side dependencies.

    step(state, pixels (B, H, W, 3) uint8, text (B, P) unit-norm float32) -> (B,) float32
    score = exp(logit_scale) * cos(image_features(normalize(pixels)), text)

Only jax/flax/numpy are imported, so benchmarks/score.py runs it on a bare accelerator image.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fifa_jax.scoring import preprocess as pp


def l2_normalize(x):
    """Rows to unit L2 norm in float32 (x / max(||x||, 1e-12))."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cast_matrices(state, dtype):
    """Cast float leaves with ndim >= 2 (weights, embeddings) to `dtype`; vectors and scalars
    (norms, biases, logit_scale) stay float32. Halves weight traffic for bf16 inference."""
    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2:
            return x.astype(dtype)
        return x
    return jax.tree.map(cast, state)


def make_score_step(model, image_cfg: pp.ImageProcessorConfig, weight_dtype=None):
    """(state, step) for a CLIPModel; see the module docstring.

    weight_dtype: cast the weight matrices of the state once (e.g. bfloat16); None keeps them.
    The model's own compute dtype is set when it is built/loaded (`dtype=`).
    """
    graphdef, state = nnx.split(model)
    if weight_dtype is not None and weight_dtype != jnp.float32:
        state = cast_matrices(state, weight_dtype)

    @jax.jit
    def step(state, pixels, text):
        m = nnx.merge(graphdef, state)
        x = pp.normalize(pixels, image_cfg)
        img = l2_normalize(m.get_image_features(x))
        scale = jnp.exp(jnp.asarray(m.logit_scale[...], jnp.float32))
        return scale * jnp.sum(img * text, axis=-1)

    return state, step
