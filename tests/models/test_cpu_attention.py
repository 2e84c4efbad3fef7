"""The fused CPU attention kernel (fifa_jax.models.cpu_attention) against a slow, obvious
float64 numpy transcription of softmax attention and its gradient, on random inputs."""
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.models import attention, cpu_attention, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no C++ compiler: the kernel cannot build")


def _numpy_attention(q, k, v, g, scale):
    """Output and (dq, dk, dv) for the cotangent g, float64, one (batch, head) at a time."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    out, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    for b in range(q.shape[0]):
        for n in range(q.shape[2]):
            qh, kh, vh, gh = q[b, :, n], k[b, :, n], v[b, :, n], g[b, :, n]
            s = scale * qh @ kh.T                                   # (T, S)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[b, :, n] = p @ vh
            dp = gh @ vh.T
            ds = p * (dp - (dp * p).sum(1, keepdims=True))          # softmax backward
            dq[b, :, n] = scale * ds @ kh
            dk[b, :, n] = scale * ds.T @ qh
            dv[b, :, n] = p.T @ gh
    return out, dq, dk, dv


def _inputs(seed, b, t, s, heads, dim, spread=3.0):
    rng = np.random.default_rng(seed)
    q = spread * rng.standard_normal((b, t, heads, dim), np.float32)
    k = spread * rng.standard_normal((b, s, heads, dim), np.float32)
    v = rng.standard_normal((b, s, heads, dim), np.float32)
    g = rng.standard_normal((b, t, heads, dim), np.float32)
    return q, k, v, g


@pytest.mark.parametrize("b,t,s,heads,dim", [
    (2, 37, 77, 3, 8),     # SD's 77 text tokens (keys padded to 80 inside)
    (1, 64, 64, 2, 40),    # SD1.5's head size
    (2, 5, 3, 1, 5),       # fewer rows than a block, a head size off the register group
    (1, 130, 17, 2, 12),
    (1, 20, 33, 1, 64)])   # SDXL's head size
def test_fused_attention_equals_numpy(b, t, s, heads, dim):
    q, k, v, g = _inputs(t * s + dim, b, t, s, heads, dim)
    scale = dim ** -0.5
    out, vjp = jax.vjp(lambda a, c, d: cpu_attention.fused_attention(a, c, d, scale), q, k, v)
    got = (out,) + jax.jit(vjp)(g)
    want = _numpy_attention(q, k, v, g, scale)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        err = np.abs(np.asarray(x, np.float64) - y).max() / np.abs(y).max()
        assert err < 4e-6, (name, err)   # float32 sums of up to 64 x 80 products


def test_fused_attention_vmap_bf16_and_nan():
    q, k, v, _ = _inputs(0, 2, 9, 11, 2, 8)
    want = attention.einsum_attention(q, k, v)
    stacked = jax.vmap(cpu_attention.fused_attention)(*(jnp.stack([a, a]) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(stacked), np.stack([want, want]), atol=2e-6)
    half = cpu_attention.fused_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=0.1)
    bad = q.copy()
    bad[1, 3, 0, 2] = np.nan        # a non-finite query poisons its row, never hides
    out = np.asarray(cpu_attention.fused_attention(bad, k, v))
    assert np.isnan(out[1, 3, 0]).all() and np.isfinite(np.delete(out[1], 3, axis=0)).all()


def test_fused_attention_sharded_equals_one_device():
    """Under a jit over 8 forced CPU devices (batch sharded) the custom call gives the
    single-device values (XLA replicates it; see the module docstring)."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    q, k, v, _ = _inputs(1, 8, 16, 77, 2, 8)
    sharded = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (q, k, v)]
    loss = lambda a, c, d: jnp.sum(cpu_attention.fused_attention(a, c, d) ** 2)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    got, want = fn(*sharded), fn(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for a, c in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_auto_takes_the_kernel_on_cpu_and_refuses_masks():
    q, k, v, _ = _inputs(2, 1, 6, 7, 2, 8)
    hlo = jax.jit(lambda a, c, d: attention.dot_product_attention(a, c, d)).lower(
        q, k, v).as_text()
    assert "fifa_attention_fwd" in hlo
    with pytest.raises(ValueError, match="fused"):
        attention.dot_product_attention(q, q, q, is_causal=True, impl="fused")


def test_build_names_the_missing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(RuntimeError, match="no-such-c\\+\\+-compiler"):
        cpu_kernels.build(str(tmp_path))


def test_without_a_compiler_auto_falls_back_to_einsum(tmp_path):
    """A fresh process with no compiler and an empty kernel cache: one warning, the einsum
    form, the same values; convolutions take XLA's forward and the per-tap kernel gradient."""
    code = ("import warnings, jax.numpy as jnp\n"
            "from fifa_jax.models import attention, cpu_attention\n"
            "q = jnp.arange(48.0).reshape(1, 6, 1, 8) / 48\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    out = attention.dot_product_attention(q, q, q)\n"
            "assert not cpu_attention.available()\n"
            "assert any('einsum' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "ref = attention.einsum_attention(q, q, q)\n"
            "assert float(abs(out - ref).max()) == 0.0\n"
            "import jax\n"
            "from fifa_jax.models import conv\n"
            "x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 16))\n"
            "hlo = jax.jit(jax.grad(lambda b: conv.conv2d(x, b, 1, 1).sum())).lower(w).as_text()\n"
            "assert 'fifa_conv_kernel_grad' not in hlo and 'fifa_conv_forward' not in hlo\n"
            "print('fell back')\n")
    env = dict(os.environ, CXX="no-such-c++-compiler", FIFA_JAX_KERNEL_CACHE=str(tmp_path),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "fell back" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_kernels_built_without_avx512_agree(tmp_path):
    """The kernels' portable paths (no AVX-512: the exp's integer 2^n, 8-float vectors), built
    for x86-64-v3 in a fresh process, against the same float64 references."""
    q, k, v, g = _inputs(7, 2, 37, 77, 2, 8)
    rng = np.random.default_rng(8)
    x, gy = rng.standard_normal((2, 6, 6, 24), np.float32), rng.standard_normal((2, 3, 3, 80),
                                                                               np.float32)
    kern = rng.standard_normal((3, 3, 24, 48), np.float32)
    np.savez(tmp_path / "in.npz", q=q, k=k, v=v, g=g, x=x, gy=gy, kern=kern)
    code = ("import sys, numpy as np, jax, jax.numpy as jnp\n"
            "from fifa_jax.models import cpu_kernels, cpu_attention, conv\n"
            "cpu_kernels.FLAGS = tuple('-march=x86-64-v3' if f == '-march=native' else f\n"
            "                          for f in cpu_kernels.FLAGS)\n"
            "assert cpu_kernels.available()\n"
            "d = dict(np.load(sys.argv[1] + '/in.npz'))\n"
            "out, vjp = jax.vjp(lambda a, c, e: cpu_attention.fused_attention(a, c, e, 0.3),\n"
            "                   d['q'], d['k'], d['v'])\n"
            "w = jnp.zeros((3, 3, 24, 80))\n"
            "dw = jax.jit(lambda a, b: conv._kernel_grad(a, b, w, 2, 1))(d['gy'], d['x'])\n"
            "y = jax.jit(lambda a, b: conv.conv2d(a, b, 1, 1))(d['x'], d['kern'])\n"
            "dq, dk, dv = vjp(d['g'])\n"
            "np.savez(sys.argv[1] + '/out.npz', out=out, dq=dq, dk=dk, dv=dv, dw=dw, y=y)\n")
    env = dict(os.environ, FIFA_JAX_KERNEL_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "cache").glob("*.so"))
    got = np.load(tmp_path / "out.npz")
    want = _numpy_attention(q, k, v, g, 0.3)
    for name, y in zip(("out", "dq", "dk", "dv"), want):
        err = np.abs(np.asarray(got[name], np.float64) - y).max() / np.abs(y).max()
        assert err < 4e-6, (name, err)
    from tests.models.test_conv import _numpy_conv, _numpy_kernel_grad
    want_dw = _numpy_kernel_grad(x, gy, 3, 3, 2, 1)
    assert np.abs(got["dw"] - want_dw).max() <= 1e-5 * np.abs(want_dw).max()
    want_y = _numpy_conv(x, kern, 1)
    assert np.abs(got["y"] - want_y).max() <= 1e-5 * np.abs(want_y).max()


def test_setup_ships_every_kernel_file():
    """A wheel must carry every file the kernel build reads (the .cc sources and the header)."""
    import fnmatch
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "setup.py"), encoding="utf-8") as f:
        patterns = re.findall(r'"(kernels/[^"]+)"', f.read())
    shipped = [os.path.relpath(p, os.path.join(root, "fifa_jax", "models"))
               for p in cpu_kernels.SOURCES + cpu_kernels.HEADERS]
    assert shipped and all(any(fnmatch.fnmatch(p, pat) for pat in patterns) for p in shipped), (
        shipped, patterns)
