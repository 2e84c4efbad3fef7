"""UNet parity with PyTorch diffusers on tiny random configs (CPU, float32).

Each config: build diffusers' UNet2DConditionModel, randomise every parameter, save_pretrained,
load with `load_unet`, run both on the same inputs; max abs error < 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from fifa_jax.models.unet_io import load_unet

TOL = 1e-4
CONTEXT = 12
# SD1.5-like: conv projections, heads from the legacy attention_head_dim, 3 levels.
SD15 = dict(block_out_channels=[8, 16, 16], layers_per_block=1, cross_attention_dim=CONTEXT,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2, norm_num_groups=4, sample_size=8)
# SD2-like: linear projections, per-block heads (head dims 2 and 8), upcast, 2 resnets a block,
# the non-default timestep features (flip_sin_to_cos False, freq_shift 1), a mid scale factor.
SD2 = dict(block_out_channels=[8, 16], layers_per_block=2, cross_attention_dim=CONTEXT,
           down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[4, 2],
           use_linear_projection=True, upcast_attention=True, norm_num_groups=4, norm_eps=1e-6,
           flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5, sample_size=8)
# SDXL-like: text_time additional embeddings, 2 transformer layers in the last block and mid.
SDXL = dict(block_out_channels=[8, 16], layers_per_block=[1, 2], cross_attention_dim=CONTEXT,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
            transformer_layers_per_block=[1, 2], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=10 + 6 * 4, norm_num_groups=4, sample_size=8)
# Less common options the parser honours: centred input, output scale factors, asymmetric
# downsample padding, odd conv kernels, a custom time embedding width, no mid block.
VARIANTS = dict(block_out_channels=[8, 16], layers_per_block=1, cross_attention_dim=CONTEXT,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2,
                norm_num_groups=4, center_input_sample=True, resnet_out_scale_factor=1.5,
                downsample_padding=0, conv_in_kernel=5, conv_out_kernel=1,
                time_embedding_dim=24, mid_block_type=None, sample_size=8)
# The demo base's global text path: the context attention-pooled into the time embedding.
POOLED_TEXT = dict(SD15, addition_embed_type="text", addition_embed_type_num_heads=3)
CASES = {"sd15": SD15, "sd2": SD2, "sdxl": SDXL, "variants": VARIANTS,
         "pooled_text": POOLED_TEXT}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.2) so no layer is trivially zero or identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def inputs(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    t = np.array([3.0, 777.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, 5, CONTEXT)).astype(np.float32)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        added = {"text_embeds": rng.standard_normal((batch, 10)).astype(np.float32),
                 "time_ids": rng.uniform(0, 1024, (batch, 6)).astype(np.float32)}
    return x, t, ctx, added


def torch_forward(model, x, t, ctx, added):
    kw = {}
    if added is not None:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                     **kw).sample.numpy()


def jit_forward(model):
    """The model's forward as one jax.jit over its state (how the trainer calls it)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a, **k: nnx.merge(graphdef, st)(*a, **k))
    return lambda *a, **k: np.asarray(fn(state, *a, **k))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> saved diffusers folder, inputs and PyTorch output (built on first use)."""
    built = {}

    def get(name):
        if name not in built:
            cfg = CASES[name]
            tmodel = randomize(TorchUNet(**cfg))
            path = tmp_path_factory.mktemp(name)
            tmodel.save_pretrained(path)
            args = inputs(cfg)
            built[name] = dict(name=name, path=str(path), args=args,
                               ref=torch_forward(tmodel, *args))
        return built[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_parity(cases, name, forms):
    case = cases(name)
    x, t, ctx, added = case["args"]
    with jax.default_matmul_precision("highest"):
        out = jit_forward(load_unet(case["path"], attention_impl="auto"))(
            x, t, ctx, added_cond_kwargs=added)
    assert out.shape == case["ref"].shape
    err = np.abs(out - case["ref"]).max()
    assert err < TOL, f"{name}: max abs err {err}"
    assert np.abs(case["ref"]).max() > 0.1  # the reference is not trivially ~0


def test_auto_attention_matches_reference_on_cpu(cases):
    case = cases("sd15")
    x, t, ctx, _ = case["args"]
    with jax.default_matmul_precision("highest"):
        out = jit_forward(load_unet(case["path"], attention_impl="auto"))(x, t, ctx)
    assert np.abs(out - case["ref"]).max() < TOL


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checked in the GPU device check")
def test_cudnn_attention_on_cpu_raises(cases):
    case = cases("sd15")
    model = load_unet(case["path"], attention_impl="cudnn", dtype=jnp.bfloat16)
    x, t, ctx, _ = case["args"]
    with pytest.raises(RuntimeError, match="cuDNN"):
        jit_forward(model)(x, t, ctx)


def test_bf16_compute_close_with_f32_params(cases):
    case = cases("sd15")
    model = load_unet(case["path"], attention_impl="xla", dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x, t, ctx, _ = case["args"]
    out = jit_forward(model)(x, t, ctx)
    ref = case["ref"]
    assert out.dtype == np.float32
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.1, rel  # bf16 rounding shows, but stays small


def test_scalar_timestep_broadcasts(cases):
    model = load_unet(cases("sd15")["path"], attention_impl="xla")
    a = np.asarray(model._time_embed(5.0, 2, None))
    b = np.asarray(model._time_embed(jnp.array([5.0, 5.0]), 2, None))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 32)


def test_sdxl_requires_added_cond_kwargs(cases):
    model = load_unet(cases("sdxl")["path"], attention_impl="xla")
    x, t, ctx, _ = cases("sdxl")["args"]
    with pytest.raises(ValueError, match="text_embeds"):
        model(x, t, ctx)


def test_pooled_text_moves_the_prediction(cases):
    """With addition_embed_type="text" the context also enters through the time embedding:
    a model whose cross-attention sees the same context but whose pooled path differs."""
    model = load_unet(cases("pooled_text")["path"], attention_impl="xla")
    x, t, ctx, _ = cases("pooled_text")["args"]
    a = np.asarray(model._time_embed(t, 2, None, ctx))
    b = np.asarray(model._time_embed(t, 2, None, ctx[::-1]))
    assert np.abs(a - b).max() > 1e-3


def test_sample_size_not_multiple_raises(cases):
    model = load_unet(cases("sd15")["path"], attention_impl="xla")
    x, t, ctx, _ = cases("sd15")["args"]
    with pytest.raises(ValueError, match="multiple of 4"):
        model(x[:, :, :6, :6], t, ctx)
