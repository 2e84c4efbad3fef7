"""AutoencoderKL parity with diffusers (encode mean/logvar, decode), sampling, round trip."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.models.unet_config import UnsupportedConfigError
from fifa_jax.models.vae import parse_vae_config
from fifa_jax.models.vae_io import load_vae, save_vae
from tests.models.test_unet_parity import randomize

TOL = 1e-4
VAE = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           norm_num_groups=4, sample_size=16, scaling_factor=0.13025, shift_factor=0.0609)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmodel = randomize(TorchVAE(**VAE), seed=2)
    path = tmp_path_factory.mktemp("vae")
    tmodel.save_pretrained(path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        dist = tmodel.encode(torch.from_numpy(x)).latent_dist
        dec = tmodel.decode(torch.from_numpy(z)).sample.numpy()
    model = load_vae(str(path), attention_impl="xla")
    graphdef, state = nnx.split(model)
    fns = {"encode": jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)),
           "decode": jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))}
    return dict(tmodel=tmodel, path=str(path), x=x, z=z, mean=dist.mean.numpy(),
                logvar=dist.logvar.numpy(), dec=dec, model=model, state=state, fns=fns)


def test_encode_parity(case):
    with jax.default_matmul_precision("highest"):
        post = case["fns"]["encode"](case["state"], case["x"])
    assert post.mean.shape == (2, 4, 8, 8)
    assert np.abs(np.asarray(post.mean) - case["mean"]).max() < TOL
    assert np.abs(np.asarray(post.logvar) - case["logvar"]).max() < TOL
    assert np.abs(case["mean"]).max() > 0.1


def test_decode_parity(case):
    with jax.default_matmul_precision("highest"):
        out = case["fns"]["decode"](case["state"], case["z"])
    assert out.shape == (2, 3, 16, 16)
    assert np.abs(np.asarray(out) - case["dec"]).max() < TOL


def test_sample_and_mode(case):
    model = case["model"]
    rng = np.random.default_rng(1)
    from fifa_jax.models.vae import DiagonalGaussian
    mean = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)
    logvar = rng.standard_normal((2, 4, 2, 2)).astype(np.float32)
    post = DiagonalGaussian(mean, logvar)
    key = jax.random.key(3)
    noise = np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(np.asarray(post.sample(key)),
                               mean + np.exp(0.5 * logvar) * noise, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(post.mode()), mean)
    assert model.scaling_factor == 0.13025 and model.shift_factor == 0.0609
    z = mean
    np.testing.assert_allclose(np.asarray(model.scale_latents(z)), (z - 0.0609) * 0.13025,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.unscale_latents(model.scale_latents(z))), z,
                               rtol=1e-5, atol=1e-6)


def test_round_trip_through_diffusers(case, tmp_path):
    save_vae(case["model"], str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["_class_name"] == "AutoencoderKL"
    back = TorchVAE.from_pretrained(str(tmp_path)).eval()
    assert back.config.scaling_factor == 0.13025
    ref_sd, back_sd = case["tmodel"].state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    with torch.no_grad():
        dec = back.decode(torch.from_numpy(case["z"])).sample.numpy()
    np.testing.assert_array_equal(dec, case["dec"])


def test_strict_missing_key(case, tmp_path):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(case["path"], "diffusion_pytorch_model.safetensors"))
    del tensors["encoder.mid_block.attentions.0.to_out.0.bias"]
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(case["path"], "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(CheckpointMismatchError,
                       match=r"encoder\.mid_block\.attentions\.0\.to_out\.0\.bias"):
        load_vae(str(tmp_path))


def test_unsupported_vae_config():
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        parse_vae_config({**VAE, "down_block_types": ["DownEncoderBlock2D", "Foo"]})
    with pytest.raises(UnsupportedConfigError, match="latents_mean"):
        parse_vae_config({**VAE, "latents_mean": [0.0] * 4})
    with pytest.raises(UnsupportedConfigError, match="unknown_key"):
        parse_vae_config({**VAE, "unknown_key": 1})
