"""GPU-only checks of the UNet's attention paths (skipped on CPU).

Run on a GPU machine: `JAX_PLATFORMS=cuda python -m pytest tests/models/test_unet_gpu.py -q -s`.
A UNet with head_dim 64 in bf16, forward and gradients:
- impl="auto" (cuDNN flash attention for self-attention; XLA for the cross-attention over
  77 tokens, an odd KV length cuDNN rejects when differentiated) with remat == impl="xla";
- impl="cudnn" with an even context length (64) == impl="xla".
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fifa_jax.models.unet import UNet2DConditionModel

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

CFG = dict(block_out_channels=[128, 256], layers_per_block=1, cross_attention_dim=768,
           down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4],
           norm_num_groups=32, sample_size=32)


def _run(impl, ctx_len, remat=None):
    model = UNet2DConditionModel(CFG, rngs=nnx.Rngs(0), attention_impl=impl,
                                 dtype=jnp.bfloat16, remat_policy=remat)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((2, ctx_len, 768)).astype(np.float32)
    t = np.array([10.0, 900.0], np.float32)

    def loss(st):
        out = nnx.merge(graphdef, st)(x, t, ctx)
        return jnp.mean(out ** 2), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(state).compile()
    uses_cudnn = "cudnn$fmha" in step.as_text() or "__cudnn" in step.as_text()
    (_, out), grads = step(state)
    return np.asarray(out), jax.tree.map(np.asarray, grads), uses_cudnn


def _rel(a, b):
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def _check(name, got, ref):
    out_err = _rel(got[0], ref[0])
    grad_err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])))
    print(f"{name}: output rel err {out_err:.2e}, worst grad rel err {grad_err:.2e}")
    assert out_err < 3e-2 and grad_err < 0.1


def test_auto_with_remat_matches_xla_77_tokens():
    ref = _run("xla", 77)
    got = _run("auto", 77, remat="nothing_saveable")
    assert got[2] and not ref[2], "auto should put self-attention on cuDNN"
    _check("auto+remat vs xla (77 tokens)", got, ref)


def test_cudnn_matches_xla_64_tokens():
    ref = _run("xla", 64)
    got = _run("cudnn", 64)
    assert got[2]
    _check("cudnn vs xla (64 tokens)", got, ref)
