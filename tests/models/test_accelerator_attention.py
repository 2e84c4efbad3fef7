"""The accelerator attention kernels: Pallas flash attention (TPU) and cuDNN (GPU).

- TPU numerics on the CPU: the Pallas kernel runs in Pallas' TPU interpret mode
  (`pltpu.force_tpu_interpret_mode`); forward and q/k/v gradients against a float64 numpy
  reference with its analytic gradient, for self-attention, 77-token cross-attention (padded
  keys, masked), a tiny odd shape (padded queries) and a 160-wide head over many key blocks
  (padded heads), also batch-sharded over 8 CPU devices (the shard_map path).
- TPU lowering: forward + backward of SD1.5's full-size attentions compiled for a compile-only
  v5e 2x2 slice (meshes (4, 1) and (2, 2)); the programs hold the Mosaic kernels and gather
  nothing (each chip runs the kernel on its batch rows).
- GPU padding on the CPU: the padded, masked `jax.nn.dot_product_attention` that
  `cudnn_attention` makes, run with implementation="xla", against the reference; the cuDNN
  call itself only where a GPU is present.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.models import gpu_attention, platform, tpu_attention


def _inputs(seed, b, t, s, n, h):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (r.standard_normal((b, s, n, h)).astype(np.float32) for _ in range(2))
    w = r.standard_normal((b, t, n, h)).astype(np.float32)   # the output's cotangent
    return q, k, v, w


def _reference(q, k, v, w, scale=None):
    """float64 softmax(q k^T * scale) v and the q, k, v gradients of sum(out * w)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    dp = np.einsum("btnh,bsnh->bnts", w, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bnts,bsnh->btnh", ds, k)
    dk = np.einsum("bnts,btnh->bsnh", ds, q)
    dv = np.einsum("bnts,btnh->bsnh", p, w)
    return out, dq, dk, dv


def _value_and_grads(fn, q, k, v, w):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(jnp.asarray(w, out.dtype)))


def _assert_close(got, want, atol, names=("out", "dq", "dk", "dv")):
    for name, x, y in zip(names, got, want):
        assert x.shape == y.shape, (name, x.shape, y.shape)
        err = np.abs(np.asarray(x, np.float64) - y).max()
        assert err < atol, (name, err)


# ---------------------------------------------------------------------------------- TPU plan


def test_plan_pads_keys_to_lanes_queries_to_blocks_and_wide_heads():
    p = tpu_attention.plan
    assert p(4096, 4096, 40) == tpu_attention.Plan(4096, 4096, 40, 512, 512)
    assert p(4096, 77, 40) == tpu_attention.Plan(4096, 128, 40, 512, 128)
    assert p(64, 64, 160) == tpu_attention.Plan(64, 128, 160, 64, 128)    # one key block
    assert p(256, 256, 160) == tpu_attention.Plan(256, 256, 160, 256, 256)
    assert p(1024, 1024, 160) == tpu_attention.Plan(1024, 1024, 256, 512, 512)
    assert p(12, 16, 4) == tpu_attention.Plan(16, 128, 4, 16, 128)
    assert p(200, 384, 64) == tpu_attention.Plan(256, 384, 64, 256, 128)


def test_applies():
    f32, bf16 = jnp.float32, jnp.bfloat16
    q = jax.ShapeDtypeStruct((8, 256, 8, 40), bf16)
    assert tpu_attention.applies(q, jax.ShapeDtypeStruct((8, 77, 8, 40), bf16))
    assert tpu_attention.applies(jax.ShapeDtypeStruct((8, 256, 8, 40), f32), q)
    assert not tpu_attention.applies(q, jax.ShapeDtypeStruct((8, 77, 4, 40), bf16))  # grouped
    assert not tpu_attention.applies(jax.ShapeDtypeStruct((8, 256, 8, 40), jnp.float16), q)
    wide = jax.ShapeDtypeStruct((8, 256, 8, 512), bf16)
    assert not tpu_attention.applies(wide, wide)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    with jax.set_mesh(mesh):
        assert tpu_attention.applies(q, q)
        odd = jax.ShapeDtypeStruct((6, 256, 8, 40), bf16)       # 6 rows over 8 devices
        assert not tpu_attention.applies(odd, odd)
    with jax.set_mesh(Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))):
        assert not tpu_attention.applies(q, q)                  # "model" would replicate it
    with pytest.raises(ValueError, match="does not apply"):
        tpu_attention.flash_attention(wide, wide, wide)

    g = gpu_attention.applies
    assert g(q, jax.ShapeDtypeStruct((8, 77, 8, 40), bf16))
    assert g(jax.ShapeDtypeStruct((2, 64, 2, 4), jnp.float16),
             jax.ShapeDtypeStruct((2, 77, 2, 4), jnp.float16))   # pads to 8
    assert not g(jax.ShapeDtypeStruct((8, 256, 8, 40), f32), q)  # cuDNN: half precision only
    assert not g(q, jax.ShapeDtypeStruct((8, 77, 4, 40), bf16))
    h128 = jax.ShapeDtypeStruct((1, 64, 1, 128), bf16)
    assert g(h128, h128)
    big = jax.ShapeDtypeStruct((1, 64, 1, 512), bf16)
    assert not g(big, big)


# ----------------------------------------------------------------- TPU numerics (interpret)


@pytest.mark.parametrize("b, t, s, n, h", [
    (2, 256, 256, 2, 40),     # self-attention, SD1.5's head width
    (2, 256, 77, 2, 64),      # cross-attention: keys padded to 128 and masked
    (1, 12, 16, 2, 4),        # tiny: queries padded to 16, keys to 128
    (1, 16, 1024, 1, 160),    # heads padded to 256: the kernel loops over two key blocks
])
def test_flash_attention_matches_reference(b, t, s, n, h):
    q, k, v, w = _inputs(t + s + h, b, t, s, n, h)
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda *a: _value_and_grads(tpu_attention.flash_attention, *a))(
            q, k, v, w)
    _assert_close(got, _reference(q, k, v, w), 1e-4)


def test_flash_attention_scale_bf16_and_sharded():
    """An explicit scale; bfloat16 operands; batch split over 8 CPU devices under
    `jax.set_mesh` (the kernel inside shard_map, each device on its rows) gives the reference
    values and keeps the batch split."""
    q, k, v, w = _inputs(3, 8, 16, 77, 2, 8)
    fn = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: tpu_attention.flash_attention(q, k, v, scale=0.3), *a))
    want = _reference(q, k, v, w, scale=0.3)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    with pltpu.force_tpu_interpret_mode():
        with jax.set_mesh(mesh):
            args = [jax.device_put(a, sharding) for a in (q, k, v, w)]
            assert "manual_computation" in fn.lower(*args).as_text()
            split = fn(*args)
        half = jax.jit(tpu_attention.flash_attention)(
            *(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    _assert_close(split, want, 1e-4)
    assert split[0].sharding.spec == P(("data", "fsdp"))
    assert half.dtype == jnp.bfloat16
    _assert_close([half], _reference(q, k, v, w)[:1], 0.05)


# ------------------------------------------------------------------------- TPU lowering

@pytest.fixture(scope="module")
def v5e():
    """The 4 compile-only chips of a v5e 2x2 slice (skips where libtpu is missing)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes hold it
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    except Exception as e:  # noqa: BLE001  (no libtpu: nothing to compile for)
        pytest.skip(f"no compile-only TPU: {e}")


# The suite's persistent compilation cache cannot load executables for compile-only devices
# (no client): it warns on each lookup and compiles, as it should.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("mesh_shape, t, s, h, dtype, via_choose", [
    ((4, 1), 4096, 4096, 40, jnp.bfloat16, False),   # SD1.5 64x64 self-attention
    ((2, 2), 4096, 77, 40, jnp.float32, False),      # SD1.5 64x64 cross-attention
    ((2, 2), 256, 77, 160, jnp.bfloat16, True),      # SD1.5 16x16 cross, platform.choose
])
def test_lowers_and_compiles_for_tpu(v5e, mesh_shape, t, s, h, dtype, via_choose):
    mesh = Mesh(np.array(v5e).reshape(mesh_shape), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    b, n = 8, 8
    args = [jax.ShapeDtypeStruct((b, x, n, h), dtype, sharding=sharding) for x in (t, s, s, t)]
    attn = tpu_attention.flash_attention
    if via_choose:
        attn = lambda q, k, v: platform.choose(                       # noqa: E731
            q, k, v, default=lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
            tpu=tpu_attention.flash_attention)
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda *a: _value_and_grads(attn, *a)).lower(*args).compile()
    hlo = compiled.as_text()
    # forward (with residuals), dK/dV and dQ kernels; no operand gathered across chips
    assert hlo.count("tpu_custom_call") >= 3, hlo.count("tpu_custom_call")
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    assert all(o.spec == P(("data", "fsdp")) for o in compiled.output_shardings)


# ---------------------------------------------------------------------------- GPU padding


def test_cudnn_padding_pads_lengths_to_64_and_heads_to_8():
    q, k, v, _ = _inputs(0, 2, 100, 77, 3, 4)
    qp, kp, vp, lengths = gpu_attention.pad_operands(*map(jnp.asarray, (q, k, v)))
    assert qp.shape == (2, 128, 3, 8) and kp.shape == vp.shape == (2, 128, 3, 8)
    assert lengths.dtype == jnp.int32 and list(lengths) == [77, 77]
    np.testing.assert_array_equal(np.asarray(kp[:, :77, :, :4]), k)
    assert not np.asarray(kp[:, 77:]).any() and not np.asarray(qp[..., 4:]).any()
    q, k, v, _ = _inputs(0, 2, 256, 64, 3, 40)
    qp, kp, vp, lengths = gpu_attention.pad_operands(*map(jnp.asarray, (q, k, v)))
    assert lengths is None and qp.shape == q.shape and kp.shape == k.shape


@pytest.mark.parametrize("b, t, s, n, h", [
    (2, 256, 77, 2, 40),      # cross-attention: keys 77 -> 128, masked
    (1, 100, 77, 2, 4),       # queries 100 -> 128, heads 4 -> 8
    (2, 64, 64, 2, 64),       # nothing to pad
])
def test_cudnn_padding_matches_reference_through_xla(b, t, s, n, h):
    """The padded, masked call `cudnn_attention` makes, run by XLA: the same values and
    gradients as unpadded attention."""
    q, k, v, w = _inputs(t + s, b, t, s, n, h)
    fn = lambda q, k, v: gpu_attention.padded_attention(q, k, v, implementation="xla")  # noqa
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda *a: _value_and_grads(fn, *a))(q, k, v, w)
    _assert_close(got, _reference(q, k, v, w), 1e-4)


@pytest.mark.skipif(not platform.has_gpu_backend(), reason="needs a GPU (cuDNN)")
@pytest.mark.parametrize("t, s, h", [(1024, 77, 40), (256, 256, 160), (64, 64, 4)])
def test_cudnn_attention_on_gpu(t, s, h):
    q, k, v, w = _inputs(1, 2, t, s, 4, h)
    gpu = jax.devices("gpu")[0]
    q, k, v, w = (jax.device_put(jnp.asarray(a, jnp.bfloat16), gpu) for a in (q, k, v, w))
    if not gpu_attention.applies(q, k):
        pytest.skip(f"head dim {h} above this GPU's cuDNN limit")
    got = jax.jit(lambda *a: _value_and_grads(gpu_attention.cudnn_attention, *a))(q, k, v, w)
    assert got[0].dtype == jnp.bfloat16
    hlo = jax.jit(gpu_attention.cudnn_attention).lower(q, k, v).as_text()
    assert "cudnn" in hlo.lower()
    want = _reference(*(np.asarray(a, np.float32) for a in (q, k, v, w)))
    for x, y in zip(got, want):
        err = np.abs(np.asarray(x, np.float64) - y).max() / np.abs(y).max()
        assert err < 0.03, err     # bfloat16 operands and outputs
