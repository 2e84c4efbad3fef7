"""The CPU convolutions (fifa_jax.models.conv: our forward and kernel-gradient kernels, the
flipped-kernel input gradient) against float64 loops and autodiff of XLA's convolution, and
the einsum attention against jax.nn.dot_product_attention, on random inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.models import attention, conv, cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                   reason="no C++ compiler: the CPU kernels cannot build")


def _reference(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout", [
    (3, 1, 1, 8, 5, 7), (3, 2, 1, 9, 5, 7), (3, 2, 0, 8, 5, 7), (1, 1, 0, 6, 5, 7),
    (3, 1, 0, 7, 5, 7), (3, 1, 2, 5, 5, 7),
    (3, 1, 1, 8, 16, 32),     # forward and input gradient both through our forward kernel
    (1, 1, 0, 6, 32, 16),     # a 1x1 convolution through it
    (3, 2, 1, 9, 16, 32)])    # stride 2: XLA's forward, our kernel gradient
def test_conv_gradient_equals_autodiff(kernel, stride, padding, size, cin, cout):
    assert jax.default_backend() == "cpu"        # the custom gradient is the one under test
    kx, kw, kg = jax.random.split(jax.random.key(kernel * 100 + stride * 10 + padding), 3)
    x = jax.random.normal(kx, (2, size, size + 1, cin))
    w = jax.random.normal(kw, (kernel, kernel, cin, cout))
    y_ref, vjp_ref = jax.vjp(lambda a, b: _reference(a, b, stride, padding), x, w)
    y, vjp = jax.vjp(lambda a, b: conv.conv2d(a, b, stride, padding), x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(y_ref).max()))
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(jax.jit(vjp)(g), vjp_ref(g)):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-5 * scale


def _numpy_conv(x, w, padding):
    """y[b, h, w] = sum_{i, j} x_pad[b, h + i, w + j] @ k[i, j], stride 1, float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            y += xp[:, i:i + ho, j:j + wo] @ w[i, j]
    return y


@needs_kernels
@pytest.mark.parametrize("kh,kw,padding,height,width,cin,cout", [
    (3, 3, 1, 8, 32, 64, 64),     # pixel blocks of 6 (+ 2) x 64 channels
    (3, 3, 1, 5, 29, 19, 48),     # 32 + 16 channels: blocks of 12 (+ 5), odd Cin
    (3, 3, 0, 6, 7, 3, 112),      # 64 + 32 + 16 channels, no padding
    (1, 1, 0, 4, 13, 40, 80),     # a 1x1 convolution, 64 + 16 channels
    (2, 3, 2, 5, 4, 8, 16),       # a non-square kernel, padding wider than a tap reaches
    (3, 3, 1, 1, 1, 4, 32)])      # one pixel: only the centre tap meets the image
def test_forward_kernel_equals_numpy(kh, kw, padding, height, width, cin, cout):
    """Our forward kernel (what `conv2d` runs on the CPU for stride 1, Cout % 16 == 0)
    against a float64 loop: every pixel-block remainder, channel tile and padding case."""
    kx, kk = jax.random.split(jax.random.key(kh * 1000 + cin * 10 + cout))
    x = jax.random.normal(kx, (2, height, width, cin))
    w = jax.random.normal(kk, (kh, kw, cin, cout))
    fn = jax.jit(lambda a, b: conv.conv2d(a, b, 1, padding))
    assert "fifa_conv_forward" in fn.lower(x, w).as_text()
    got = np.asarray(fn(x, w), np.float64)
    want = _numpy_conv(x, w, padding)
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


def test_forward_kernel_skipped_where_it_does_not_apply():
    """Stride 2 or Cout not a multiple of 16: XLA's convolution, the same values."""
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 16))
    for w, stride in ((jnp.ones((3, 3, 16, 8)), 1), (jnp.ones((3, 3, 16, 16)), 2)):
        fn = jax.jit(lambda a, b, s=stride: conv.conv2d(a, b, s, 1))
        assert "fifa_conv_forward" not in fn.lower(x, w).as_text()
        np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(_reference(x, w, stride, 1)))


def _numpy_kernel_grad(x, g, kh, kw, stride, padding):
    """dW[i, j, ci, co] = sum over output pixels of x_pad[b, h*s + i, w*s + j, ci] g[b, h, w, co],
    float64, one output pixel at a time."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dw = np.zeros((kh, kw, x.shape[3], g.shape[3]))
    for b in range(g.shape[0]):
        for h in range(g.shape[1]):
            for w in range(g.shape[2]):
                for i in range(kh):
                    for j in range(kw):
                        dw[i, j] += np.outer(xp[b, h * stride + i, w * stride + j], g[b, h, w])
    return dw


@needs_kernels
@pytest.mark.parametrize("kh,kw,stride,padding,size,cin,cout", [
    (3, 3, 1, 1, 8, 5, 16),     # channel tiles of 4 and 1
    (3, 3, 2, 1, 9, 12, 80),    # stride 2; 64 + 16 output channels; tiles of 8 and 4
    (3, 3, 2, 0, 8, 19, 48),    # two channel groups (16 + 3)
    (2, 3, 1, 2, 5, 3, 32),     # a non-square kernel, padding wider than a tap reaches
    (3, 3, 1, 0, 7, 8, 64)])
def test_kernel_gradient_kernel_equals_numpy(kh, kw, stride, padding, size, cin, cout):
    """Our C++ kernel gradient (the path `conv2d` takes on the CPU) against a float64 loop."""
    kx, kg = jax.random.split(jax.random.key(kh * 1000 + cin * 10 + stride))
    x = jax.random.normal(kx, (2, size, size + 1, cin))
    w = jnp.zeros((kh, kw, cin, cout))
    g = jax.random.normal(kg, _reference(x, w, stride, padding).shape)
    got = jax.jit(lambda g_, x_: conv._kernel_grad(g_, x_, w, stride, padding))(g, x)
    want = _numpy_kernel_grad(x, g, kh, kw, stride, padding)
    assert float(np.abs(np.asarray(got) - want).max()) <= 1e-5 * float(np.abs(want).max())
    hlo = jax.jit(jax.grad(lambda w_: jnp.sum(conv.conv2d(x, w_, stride, padding) * g))).lower(
        w).as_text()
    assert "fifa_conv_kernel_grad" in hlo


@needs_kernels
def test_kernel_gradient_kernel_sharded_equals_one_device():
    """8 forced CPU devices, the batch sharded: the same gradient as one device."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
    loss = lambda a, b: jnp.sum(jnp.tanh(conv.conv2d(a, b, 1, 1)))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    got = fn(jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), w)
    want = fn(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_conv_gradient_under_remat_and_second_use():
    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 3))
    f = lambda a, b: jnp.sum(jnp.tanh(conv.conv2d(conv.conv2d(a, b, 1, 1), b, 1, 1)))
    fr = lambda a, b: jnp.sum(jnp.tanh(_reference(_reference(a, b, 1, 1), b, 1, 1)))
    got = jax.jit(jax.grad(jax.checkpoint(f), argnums=(0, 1)))(x, w)
    want = jax.grad(fr, argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,s,heads,dim", [(16, 16, 2, 8), (12, 7, 4, 4), (1, 5, 1, 3)])
def test_einsum_attention_equals_xla(t, s, heads, dim):
    ks = jax.random.split(jax.random.key(t * s), 4)
    q = 3.0 * jax.random.normal(ks[0], (2, t, heads, dim))
    k = 3.0 * jax.random.normal(ks[1], (2, s, heads, dim))
    v = jax.random.normal(ks[2], (2, s, heads, dim))
    g = jax.random.normal(ks[3], (2, t, heads, dim))

    def run(impl):
        out, vjp = jax.vjp(lambda a, b, c: attention.dot_product_attention(a, b, c, impl=impl),
                           q, k, v)
        return (out,) + vjp(g)
    for got, want in zip(run("einsum"), run("xla")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)


def test_einsum_attention_refuses_masks_and_auto_falls_back():
    q = jnp.ones((1, 4, 2, 8))
    mask = jnp.tril(jnp.ones((4, 4), bool))
    with pytest.raises(ValueError, match="einsum"):
        attention.dot_product_attention(q, q, q, mask=mask, impl="einsum")
    out = attention.dot_product_attention(q, q, q, is_causal=True, impl="auto")
    np.testing.assert_allclose(np.asarray(out), np.asarray(q), rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("shape,din,dout", [((2, 37), 24, 48), ((5,), 768, 64),
                                             ((3, 4, 7), 19, 16)])
def test_dense_gradient_equals_autodiff(shape, din, dout):
    """`dense` (Linear's product): our kernel's weight gradient, XLA's input gradient, against
    autodiff of jnp.dot; output sizes that are not a multiple of 16 take plain autodiff."""
    from fifa_jax.models.dense import dense
    kx, kw, kg = jax.random.split(jax.random.key(din * dout), 3)
    x = jax.random.normal(kx, shape + (din,))
    w = jax.random.normal(kw, (din, dout))
    g = jax.random.normal(kg, shape + (dout,))
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(dense(a, b) * g), argnums=(0, 1)))(x, w)
    want = jax.grad(lambda a, b: jnp.sum(jnp.dot(a, b, precision="highest") * g),
                    argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())
    hlo = jax.jit(jax.grad(lambda b: jnp.sum(dense(x, b)))).lower(w).as_text()
    assert "fifa_conv_kernel_grad" in hlo
    w7 = jnp.ones((din, 7))
    hlo7 = jax.jit(jax.grad(lambda b: jnp.sum(dense(x, b)))).lower(w7).as_text()
    assert "fifa_conv_kernel_grad" not in hlo7
