"""Real CLIP configs (SD1.5, SD2.1, SDXL encoder 2, PickScore) build abstractly; parameter
counts, PyTorch key names and shapes equal transformers' models built on the meta device."""
import os

import jax
import pytest
import torch
import transformers as tf
from flax import nnx

from fifa_jax.models import clip_io
from fifa_jax.models.clip import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection
from fifa_jax.models.clip_config import read_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures_clip")
CASES = {
    "sd15_text_encoder": (CLIPTextModel, tf.CLIPTextModel, tf.CLIPTextConfig),
    "sd21_text_encoder": (CLIPTextModel, tf.CLIPTextModel, tf.CLIPTextConfig),
    "sdxl_text_encoder_2": (CLIPTextModelWithProjection, tf.CLIPTextModelWithProjection,
                            tf.CLIPTextConfig),
    "pickscore_v1": (CLIPModel, tf.CLIPModel, tf.CLIPConfig),
}


def _torch_meta(name):
    _, torch_cls, cfg_cls = CASES[name]
    cfg = cfg_cls.from_pretrained(os.path.join(FIXTURES, name))
    with torch.device("meta"):
        return torch_cls(cfg)


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_config_builds_with_torch_param_count_and_names(name):
    ours_cls = CASES[name][0]
    config, _ = read_config(os.path.join(FIXTURES, name))
    model = clip_io.build(config, ours_cls)   # abstract: no arrays allocated
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    ref = _torch_meta(name)
    assert clip_io.param_count(model) == sum(p.numel() for p in ref.parameters())
    # our explicit name map covers exactly transformers' (5.x) state dict, same shapes
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {k: v[2] for k, v in clip_io.name_map(model).items()}
    assert ours == ref_shapes


def test_sd15_text_encoder_param_count_literal():
    config, _ = read_config(os.path.join(FIXTURES, "sd15_text_encoder"))
    assert clip_io.param_count(clip_io.build(config)) == 123_060_480


def test_sd21_and_sdxl_shapes():
    sd21, _ = read_config(os.path.join(FIXTURES, "sd21_text_encoder"))
    assert (sd21.hidden_size, sd21.num_hidden_layers, sd21.hidden_act) == (1024, 23, "gelu")
    sdxl, _ = read_config(os.path.join(FIXTURES, "sdxl_text_encoder_2"))
    model = clip_io.build(sdxl, CLIPTextModelWithProjection)
    assert model.text_projection.kernel.shape == (1280, 1280)
