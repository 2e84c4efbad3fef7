"""UNet gradient parity with PyTorch diffusers (CPU, float32, tiny random weights).

The loss is L = sum(UNet(x, t, ctx) * W) with a fixed random W (so dL/d(out) = W exactly, on
both sides). For every parameter and for the input sample x, our gradient (mapped to PyTorch's
name and layout by `unet_name_map` / `to_torch_layout`) must satisfy, per tensor,

    max |g_ours - g_torch|  <=  REL * max(max |g_torch|, FLOOR)

with REL = 1e-4 (relative to the tensor's own largest gradient) and FLOOR = 1e-3 (an absolute
floor for tensors whose gradients are all tiny, e.g. biases of layers that are nearly cancelled
by a following norm). The key sets of both sides must be equal. Cases: an SD1.5-like config
(cross-attention down / mid / up blocks, conv projections) with remat off and on, and an
SDXL-like one (linear projections, two transformer layers, text_time added conditioning) with
remat on.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from fifa_jax.models.safetensors_io import to_torch_layout
from fifa_jax.models.unet_io import load_unet, unet_name_map
from tests.models.test_unet_parity import SD15, SDXL, inputs, randomize

REL, FLOOR = 1e-4, 1e-3
# SD1.5-like on two levels (compiles in half the time of the three-level parity config):
# cross-attention in a down block, the mid block and an up block; conv projections.
SD15_2 = dict(SD15, block_out_channels=[8, 16],
              down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
CASES = {"sd15": SD15_2, "sdxl": SDXL}


def torch_grads(model, x, t, ctx, added, w):
    """{param name: grad} and d/dx of sum(model(x) * w), float32 numpy."""
    model.zero_grad()
    xt = torch.from_numpy(x).requires_grad_(True)
    kw = {}
    if added is not None:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    out = model(xt, torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample
    (out * torch.from_numpy(w)).sum().backward()
    params = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    return params, xt.grad.detach().numpy().copy()


def jax_grads(model, x, t, ctx, added, w):
    """The same gradients from our model, parameters in PyTorch names and layout."""
    graphdef, state = nnx.split(model)   # merged inside the trace: required with remat

    def loss(st, x):
        out = nnx.merge(graphdef, st)(x, t, ctx, added_cond_kwargs=added)
        return jnp.sum(out * w)

    with jax.default_matmul_precision("highest"):
        g_state, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_state)}
    params = {key: to_torch_layout(kind, flat[path])
              for key, (path, kind, _) in unet_name_map(model).items()}
    return params, np.asarray(g_x)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (saved diffusers folder, inputs, W, torch param grads, torch input grad)."""
    built = {}

    def get(name):
        if name not in built:
            cfg = CASES[name]
            tmodel = randomize(TorchUNet(**cfg), seed=3)
            path = tmp_path_factory.mktemp(f"grad_{name}")
            tmodel.save_pretrained(path)
            args = inputs(cfg)
            w = np.random.default_rng(7).standard_normal(args[0].shape).astype(np.float32)
            built[name] = (str(path), args, w, *torch_grads(tmodel, *args, w))
        return built[name]
    return get


def _check(name, ours, ref):
    err = np.abs(ours - ref).max() if ref.size else 0.0
    scale = max(float(np.abs(ref).max()) if ref.size else 0.0, FLOOR)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs {ref.shape}"
    assert err <= REL * scale, f"{name}: max abs err {err:.3g} > {REL} * {scale:.3g}"
    return err / scale


@pytest.mark.parametrize("name,remat", [("sd15", None), ("sd15", "nothing_saveable"),
                                        ("sdxl", "dots_saveable")])
def test_grad_parity(cases, name, remat, forms):
    path, (x, t, ctx, added), w, ref_params, ref_x = cases(name)
    model = load_unet(path, attention_impl="auto", remat_policy=remat)
    params, g_x = jax_grads(model, x, t, ctx, added, w)
    assert set(params) == set(ref_params)
    worst = max(_check(k, params[k], ref_params[k]) for k in sorted(ref_params))
    _check("sample", g_x, ref_x)
    # the references are not trivially zero: most tensors see real gradient signal
    big = sum(np.abs(g).max() > FLOOR for g in ref_params.values())
    assert big > 0.9 * len(ref_params), (big, len(ref_params))
    assert np.abs(ref_x).max() > 0.1
    print(f"{name} remat={remat} forms={forms}: worst relative error {worst:.2e}")
