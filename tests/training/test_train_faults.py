"""The train stage's faults are one line naming what to change: a base model that does not
fit the encoded data, a non-finite step, a step that does not fit in memory."""
import pathlib

import pytest

from fifa_jax.errors import InputError
from fifa_jax.models.unet_config import parse_unet_config
from fifa_jax.training import train
from tests.training import _tiny

SPEC = {"latent_shape": [4, 4, 4], "embeds_shape": [3, 6], "is_sdxl": False}


def test_base_model_that_does_not_fit_the_data_is_named():
    cfg = parse_unet_config(_tiny.TINY)
    train._check_base(cfg, SPEC, "/base/unet")
    with pytest.raises(InputError, match=r"/base/unet/config.json: in_channels=4, but the "
                                         r"encoded latents have 8 channels"):
        train._check_base(cfg, dict(SPEC, latent_shape=[8, 4, 4]), "/base/unet")
    with pytest.raises(InputError, match="cross_attention_dim=.*have 768 features"):
        train._check_base(cfg, dict(SPEC, embeds_shape=[77, 768]), "/base/unet")
    with pytest.raises(InputError, match="addition_embed_type=None but the encoded text "
                                         "states are SDXL-style"):
        train._check_base(cfg, dict(SPEC, is_sdxl=True), "/base/unet")


def test_non_finite_step_names_step_and_metric():
    train._check_finite(3, {"finite": 1.0, "loss": 0.7, "grad_norm": 1.0})
    with pytest.raises(train.NonFiniteError,
                       match=r"non-finite loss and grad_norm at step 7 .*nothing after step 6"):
        train._check_finite(7, {"finite": 0.0, "loss": float("nan"),
                                "grad_norm": float("inf")})
    with pytest.raises(train.NonFiniteError, match="non-finite grad_norm at step 2"):
        train._check_finite(2, {"finite": 0.0, "loss": 0.5, "grad_norm": float("nan")})


def test_out_of_memory_names_the_settings():
    tc = train.default_config()

    class Mesh:
        size = 8
        shape = {"fsdp": 1}

    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")
    assert train._memory_error(error) and not train._memory_error(ValueError("shape"))
    msg = str(train._too_large(tc, Mesh(), error))
    for setting in ("train.batch_size", "train.grad_accum", "train.remat=nothing_saveable",
                    "mesh.fsdp", "train.ref_dtype=bfloat16"):
        assert setting in msg


def test_caption_dropout_outside_0_1_is_refused():
    from fifa_jax.errors import ConfigError
    tc = train.default_config()
    tc.caption_dropout = 1.5
    with pytest.raises(ConfigError, match="train.caption_dropout"):
        train.check_config(tc)


def test_platform_only_attention_off_its_platform_is_one_line(monkeypatch, tmp_path):
    from fifa_jax import config_check
    from fifa_jax.models.attention import platform_error
    assert platform_error("fused", "cpu", "k") is None
    assert platform_error("auto", "tpu", "k") is None and platform_error("xla", "gpu", "k") is None
    assert "GPU devices only" in platform_error("cudnn", "tpu", "k")
    # the train stage refuses it on an accelerator mesh before loading anything
    config = config_check.load_config_file(
        str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo.py"))
    config.train.base_model, config.train.attention_impl = "/nowhere", "fused"
    monkeypatch.setattr(train.pair_dataset, "read_spec", lambda d: {})
    monkeypatch.setattr(train, "device_platform", lambda mesh: "tpu")
    with pytest.raises(InputError) as e:
        train.run(config, tmp_path)
    assert str(e.value).startswith("config key 'train.attention_impl' = 'fused' runs on CPU "
                                   "devices only, but the mesh is on TPU")
    assert "\n" not in str(e.value)
