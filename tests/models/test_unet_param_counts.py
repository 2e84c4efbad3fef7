"""The real SD1.5 / SD2.1 / SDXL UNet and VAE configs build abstractly with exactly the
PyTorch models' parameters (count, names and shapes); PyTorch side built on the meta device."""
import json
import os
import time

import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet

from fifa_jax.models.torch_names import count_params
from fifa_jax.models.unet_io import abstract_unet, unet_name_map
from fifa_jax.models.vae_io import abstract_vae, vae_name_map

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
KNOWN = {"sd15_unet": 859_520_964}


def _config(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["sd15_unet", "sd21_unet", "sdxl_unet",
                                  "sd15_vae", "sd21_vae", "sdxl_vae"])
def test_param_count_and_names_match_pytorch(name):
    cfg = _config(name)
    is_unet = name.endswith("unet")
    with torch.device("meta"):
        tmodel = (TorchUNet if is_unet else TorchVAE).from_config(cfg)
    torch_shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    torch_count = sum(p.numel() for p in tmodel.parameters())
    start = time.perf_counter()
    model = (abstract_unet if is_unet else abstract_vae)(cfg)
    assert time.perf_counter() - start < 30, "abstract build should be fast"
    assert count_params(model) == torch_count
    if name in KNOWN:
        assert torch_count == KNOWN[name]
    names = (unet_name_map if is_unet else vae_name_map)(model)
    assert {k: v[2] for k, v in names.items()} == torch_shapes


def test_fixture_configs_are_the_published_ones():
    sd21, sdxl = _config("sd21_unet"), _config("sdxl_unet")
    assert sd21["attention_head_dim"] == [5, 10, 20, 20] and sd21["use_linear_projection"]
    assert sd21["cross_attention_dim"] == 1024 and sd21["upcast_attention"] is True
    assert sdxl["transformer_layers_per_block"] == [1, 2, 10]
    assert sdxl["projection_class_embeddings_input_dim"] == 2816
    assert sdxl["addition_time_embed_dim"] == 256 and sdxl["cross_attention_dim"] == 2048
    assert _config("sdxl_vae")["scaling_factor"] == 0.13025
