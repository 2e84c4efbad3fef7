"""Remat per block: identical outputs and gradients with and without gradient checkpointing."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fifa_jax.models.remat import POLICIES, resolve_policy
from fifa_jax.models.unet import UNet2DConditionModel

# One level with attention, so down, mid and up blocks all carry transformers.
TINY = dict(block_out_channels=[8], layers_per_block=1, cross_attention_dim=6,
            down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
            attention_head_dim=2, norm_num_groups=4, sample_size=4)


def _value_and_grad(policy):
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0), attention_impl="xla",
                                 remat_policy=policy)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 3, 6)).astype(np.float32)
    t = np.array([1.0, 500.0], np.float32)

    def loss(st):
        out = nnx.merge(graphdef, st)(x, t, ctx)
        return jnp.mean(out ** 2), out

    with jax.default_matmul_precision("highest"):
        (val, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return val, out, grads


def test_remat_same_outputs_and_grads():
    v0, o0, g0 = _value_and_grad(None)
    v1, o1, g1 = _value_and_grad("nothing_saveable")
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) > 0
    assert any(np.abs(np.asarray(a)).max() > 0 for a in leaves0)
    for a, b in zip(leaves0, leaves1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def _remat_count(policy) -> int:
    model = UNet2DConditionModel(TINY, rngs=nnx.Rngs(0), attention_impl="xla",
                                 remat_policy=policy)
    graphdef, state = nnx.split(model)
    x = jnp.zeros((1, 4, 4, 4))
    fwd = lambda st, x: nnx.merge(graphdef, st)(x, 1.0, jnp.zeros((1, 3, 6)))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(fwd)(state, x))
    return len(re.findall(r"\b(?:remat\d*|checkpoint)\[", jaxpr))


def test_remat_is_in_the_jaxpr():
    assert _remat_count(None) == 0
    assert _remat_count("dots_saveable") == 3  # down, mid, up block


def test_policy_names():
    for name in POLICIES:
        assert resolve_policy(name) is not None
    assert resolve_policy(None) is None and resolve_policy("none") is None
    with pytest.raises(ValueError, match="remat policy"):
        UNet2DConditionModel(TINY, rngs=nnx.Rngs(0), remat_policy="save_everything_please")
