"""The norms of `fifa_jax.models.layers` against torch.nn (float32, values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fifa_jax.models.layers import GroupNorm, LayerNorm


def _grads_both(jax_norm, torch_norm, x: np.ndarray, w: np.ndarray, channels_first: bool):
    """(y, dL/dx, dL/dscale, dL/dbias) of L = sum(norm(x) * w) on both sides; x is NHWC."""
    gdef, state = nnx.split(jax_norm)

    def loss(state, xj):
        y = nnx.merge(gdef, state)(xj)
        return jnp.sum(y * w), y

    (_, y), (gs, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        state, jnp.asarray(x))
    ours = (np.asarray(y), np.asarray(gx), np.asarray(gs["scale"][...]),
            np.asarray(gs["bias"][...]))
    xt = torch.tensor(np.moveaxis(x, -1, 1) if channels_first else x, requires_grad=True)
    yt = torch_norm(xt)
    wt = torch.tensor(np.moveaxis(w, -1, 1) if channels_first else w)
    (yt * wt).sum().backward()
    back = (lambda a: np.moveaxis(a, 1, -1)) if channels_first else (lambda a: a)
    theirs = (back(yt.detach().numpy()), back(xt.grad.numpy()),
              torch_norm.weight.grad.numpy(), torch_norm.bias.grad.numpy())
    return ours, theirs


@pytest.mark.parametrize("groups,channels,hw", [(32, 64, 8), (32, 32, 5), (4, 64, 6),
                                                 (1, 12, 7), (3, 9, 4)])
def test_group_norm_matches_torch(groups, channels, hw):
    """Every group size (1 channel a group, one group, odd counts) and odd spatial sizes:
    values and the gradients of x, scale and bias within 1e-4 of torch.nn.GroupNorm."""
    rng = np.random.default_rng(groups * 100 + channels)
    x = (rng.standard_normal((3, hw, hw + 1, channels)) * 2.0 + 0.7).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    ours = GroupNorm(groups, channels, 1e-5)
    ours.scale[...] = jnp.asarray(scale)
    ours.bias[...] = jnp.asarray(bias)
    ref = torch.nn.GroupNorm(groups, channels, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(scale))
        ref.bias.copy_(torch.tensor(bias))
    got, want = _grads_both(ours, ref, x, w, channels_first=True)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()),
                                   err_msg=name)


def test_group_norm_statistics_are_per_sample_and_group():
    """A group's output does not depend on another sample's or another group's values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    gn = GroupNorm(4, 8, 1e-6)
    y = np.asarray(gn(jnp.asarray(x)))
    x2 = x.copy()
    x2[1] *= 50.0               # another sample
    x2[0, ..., 2:] += 9.0       # other groups of the same sample (channels 2.. = groups 1..3)
    y2 = np.asarray(gn(jnp.asarray(x2)))
    np.testing.assert_allclose(y2[0, ..., :2], y[0, ..., :2], rtol=1e-6, atol=1e-6)
    # each (sample, group) is normalised: mean 0, variance 1 (biased, as torch)
    yg = y.reshape(2, -1, 4, 2)
    np.testing.assert_allclose(yg.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(yg.var(axis=(1, 3)), 1.0, rtol=1e-4)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="10 channels not divisible into 4 groups"):
        GroupNorm(4, 10, 1e-5)


def test_layer_norm_matches_torch():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 24)) * 3.0 - 1.0).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    ours = LayerNorm(24, 1e-5)
    ref = torch.nn.LayerNorm(24, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 1.5, 24))
        ref.bias.copy_(torch.linspace(-1.0, 1.0, 24))
    ours.scale[...] = jnp.linspace(0.5, 1.5, 24)
    ours.bias[...] = jnp.linspace(-1.0, 1.0, 24)
    got, want = _grads_both(ours, ref, x, w, channels_first=False)
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()),
                                   err_msg=name)
