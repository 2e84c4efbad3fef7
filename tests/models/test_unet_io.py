"""UNet weight interchange: round trip through diffusers, strict keys, sharded and fp16 files,
config validation."""
import copy
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fifa_jax.models.safetensors_io import CheckpointMismatchError
from fifa_jax.models.unet_config import UnsupportedConfigError, parse_unet_config
from fifa_jax.models.unet_io import load_unet, save_unet, unet_name_map
from tests.models.test_unet_parity import SD2, SDXL, inputs, randomize, torch_forward

WEIGHTS = "diffusion_pytorch_model.safetensors"


def flat(model) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random SDXL-like diffusers UNet (text_time, linear projections) saved to disk."""
    tmodel = randomize(TorchUNet(**SDXL), seed=1)
    path = tmp_path_factory.mktemp("unet")
    tmodel.save_pretrained(path)
    return tmodel, str(path)


def test_round_trip_through_diffusers(saved, tmp_path):
    tmodel, path = saved
    save_unet(load_unet(path), str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["_class_name"] == "UNet2DConditionModel"
    with open(os.path.join(path, "config.json")) as f:
        original = json.load(f)
    assert {k: v for k, v in written.items() if not k.startswith("_")} == \
        {k: v for k, v in original.items() if not k.startswith("_")}
    back = TorchUNet.from_pretrained(str(tmp_path)).eval()
    ref_sd, back_sd = tmodel.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], back_sd[k]), k
    args = inputs(SDXL)
    np.testing.assert_array_equal(torch_forward(back, *args), torch_forward(tmodel, *args))
    with safe_open(str(tmp_path / WEIGHTS), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_our_save_reloads_identically(saved, tmp_path):
    _, path = saved
    a = load_unet(path)
    save_unet(a, str(tmp_path))
    fa, fb = flat(a), flat(load_unet(str(tmp_path)))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])


def _rewrite(path, dst, edit):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    tensors = load_file(os.path.join(path, WEIGHTS))
    edit(tensors)
    save_file(tensors, os.path.join(dst, WEIGHTS), metadata={"format": "pt"})


def test_strict_renamed_key_names_both_keys(saved, tmp_path):
    _, path = saved
    key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"

    def rename(t):
        t[key.replace("to_k", "to_key")] = t.pop(key)
    _rewrite(path, tmp_path, rename)
    with pytest.raises(CheckpointMismatchError) as err:
        load_unet(str(tmp_path))
    assert key in str(err.value) and "to_key" in str(err.value)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


def test_strict_wrong_shape_names_key(saved, tmp_path):
    _, path = saved
    key = "mid_block.resnets.1.conv1.weight"

    def reshape(t):
        t[key] = np.zeros((16, 16, 1, 3), np.float32)
    _rewrite(path, tmp_path, reshape)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape for mid_block\.resnets\.1"
                                                      r"\.conv1\.weight"):
        load_unet(str(tmp_path))


def test_sharded_checkpoint_loads(saved, tmp_path):
    tmodel, path = saved
    tmodel.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / (WEIGHTS + ".index.json"))
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    fa, fb = flat(load_unet(path)), flat(load_unet(str(tmp_path)))
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])


def test_fp16_variant_loads_as_float32(saved, tmp_path):
    tmodel, path = saved
    copy.deepcopy(tmodel).half().save_pretrained(tmp_path, variant="fp16")
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(FileNotFoundError):
        load_unet(str(tmp_path))  # only the variant file is there
    model = load_unet(str(tmp_path), variant="fp16")
    ours = flat(model)
    names = unet_name_map(model)
    ref = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    for key, (path_, kind, _) in names.items():
        got = ours[path_]
        assert got.dtype == np.float32
        want = ref[key].astype(np.float16).astype(np.float32)
        want = {"conv": lambda a: a.transpose(2, 3, 1, 0), "linear": lambda a: a.T,
                "same": lambda a: a}[kind](want)
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_name_map_covers_diffusers_state_dict(saved):
    tmodel, path = saved
    names = unet_name_map(load_unet(path))
    assert {k: v[2] for k, v in names.items()} == \
        {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}


@pytest.mark.parametrize("key,value", [
    ("only_cross_attention", True), ("dual_cross_attention", True),
    ("class_embed_type", "timestep"), ("addition_embed_type", "image"),
    ("resnet_time_scale_shift", "scale_shift"), ("time_embedding_type", "fourier"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("encoder_hid_dim", 32),
    ("attention_type", "gated"), ("dropout", 0.1), ("some_new_option", 1),
])
def test_unsupported_config_values_raise(key, value):
    with pytest.raises(UnsupportedConfigError, match=key):
        parse_unet_config({**SD2, key: value})


def test_unsupported_block_type_raises():
    cfg = {**SD2, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}
    with pytest.raises(UnsupportedConfigError, match="SimpleCrossAttnDownBlock2D"):
        parse_unet_config(cfg)


def test_text_time_needs_dims():
    cfg = {**SDXL, "addition_time_embed_dim": None}
    with pytest.raises(UnsupportedConfigError, match="addition_time_embed_dim"):
        parse_unet_config(cfg)


def test_pooled_text_heads_must_divide_the_context():
    cfg = {**SD2, "addition_embed_type": "text", "addition_embed_type_num_heads": 5}
    with pytest.raises(UnsupportedConfigError, match="addition_embed_type_num_heads=5"):
        parse_unet_config(cfg)
    ok = parse_unet_config({**cfg, "addition_embed_type_num_heads": 4})
    assert (ok.addition_embed_type, ok.addition_embed_type_num_heads) == ("text", 4)


def test_legacy_head_rule_and_num_attention_heads():
    assert parse_unet_config(SD2).num_heads == (4, 2)            # attention_head_dim = heads
    assert parse_unet_config({**SD2, "attention_head_dim": 8}).num_heads == (8, 8)
    assert parse_unet_config({**SD2, "num_attention_heads": [1, 2]}).num_heads == (1, 2)


def test_load_runs_no_eager_init(saved, monkeypatch):
    """load_unet builds shapes abstractly: initialisers only ever see tracers."""
    import fifa_jax.models.layers as layers
    seen = []
    real = layers._kernel_init

    def spy(key, shape, dtype):
        seen.append(isinstance(key, jax.core.Tracer))
        return real(key, shape, dtype)
    monkeypatch.setattr(layers, "_kernel_init", spy)
    load_unet(saved[1])
    assert seen and all(seen)


def test_sharded_fp16_variant_loads_with_diffusers_index_name(tmp_path):
    """diffusers writes a sharded variant's index as `...safetensors.index.fp16.json`."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    from fifa_jax.models.safetensors_io import find_weights

    torch.manual_seed(0)
    tiny = TorchUNet(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                     attention_head_dim=2, norm_num_groups=4, sample_size=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    tiny.half().save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    found = find_weights(str(tmp_path), ["diffusion_pytorch_model"], "fp16")
    assert found.endswith(".index.fp16.json")
    model = load_unet(str(tmp_path), variant="fp16")
    ref = tiny.state_dict()["conv_in.weight"].float().numpy()
    got = np.transpose(np.asarray(model.conv_in.kernel[...]), (3, 2, 0, 1))
    np.testing.assert_array_equal(got, ref)
