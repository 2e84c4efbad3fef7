"""A 5-step guided DDIM run of a tiny random UNet: diffusers (torch UNet + DDIMScheduler driven as
StableDiffusionPipeline.__call__ does) vs `make_denoise` on our `load_unet` of the same folder.
Max abs diff of the final latents < 1e-4 (float32, matmul precision "highest")."""
import jax
import numpy as np
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from fifa_jax.models.unet_io import load_unet
from fifa_jax.sampling import make_denoise
from tests.sampling.reference import SD15, diffusers_loop

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
            sample_size=8, in_channels=4, out_channels=4)


def test_tiny_unet_guided_ddim_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    unet = TorchUNet(**TINY).eval()
    unet.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    cond = rng.standard_normal((2, 7, 32)).astype(np.float32)
    uncond = rng.standard_normal((2, 7, 32)).astype(np.float32) * 0.1

    ref, _ = diffusers_loop("ddim", SD15, 5, noise, cond, uncond, guidance_scale=7.5,
                            model=lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample)

    graphdef, state = nnx.split(load_unet(str(tmp_path)))
    sample = make_denoise(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c),
                          scheduler_config=SD15, sampler="ddim", num_steps=5, guidance_scale=7.5)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(sample(state, noise, cond, uncond))
    assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0.1
    err = np.abs(ours - ref).max()
    assert err < 1e-4, f"max abs diff {err:.3g}"
