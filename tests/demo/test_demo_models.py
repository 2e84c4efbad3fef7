"""The shipped demo models: they load with the real loaders, the VAE reconstructs world images,
the proxy reward's margins track the true reward's, the base samples follow their prompts, and
`build_models` runs end to end and reproducibly (its quick preset; never the full build)."""
import os

import numpy as np
import pytest

from fifa_jax.demo import world as dw
from fifa_jax.demo import build_models, measure, train_clip, train_vae, world_data
from fifa_jax.models.pipeline import load_pipeline
from fifa_jax.scoring import margins
from fifa_jax.demo.reward import build_demo_reward
from fifa_jax.demo.base import build_demo_base

PSNR_CLEAN_FLOOR = 24.0    # dB, decode(mean(encode(x))) of noise-free 64 x 64 renders
PSNR_WORLD_FLOOR = 20.0    # dB, of world images (pixel noise up to std 60 is not kept)
PEARSON_FLOOR = 0.5        # proxy margin vs true margin on fresh world pairs
SPEARMAN_FLOOR = 0.5
PACKAGE_BYTES = 20_000_000


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("demo") / "base")


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    return build_demo_reward(tmp_path_factory.mktemp("demo") / "reward")


def _tree_bytes(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def test_shipped_files_are_small():
    total = sum(len(b) for b in _tree_bytes(build_models.DEFAULT_OUT).values())
    assert total < PACKAGE_BYTES, total


def test_base_loads_with_the_pipeline_loader(base):
    pipe = load_pipeline(base)
    assert pipe.skipped == ()
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    assert pipe.unet.config.cross_attention_dim[0] == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"


def test_vae_reconstructs_world_images(base):
    vae = load_pipeline(base, components=["vae"]).vae
    data = world_data.draw(16, seed=7)
    rng = np.random.default_rng(7)
    clean = np.stack([np.asarray(dw.render(dict(s, aesthetic=1.0), 64, rng))
                      for s in data.scenes])
    both = train_vae.reconstruct(vae, np.concatenate([clean, data.images]), batch=32)
    assert train_vae.psnr(both[:16], clean) > PSNR_CLEAN_FLOOR
    assert train_vae.psnr(both[16:], data.images) > PSNR_WORLD_FLOOR
    z = np.asarray(vae.scale_latents(vae.encode(world_data.to_model_images(clean)).mean))
    assert z.shape == (16, 4, 16, 16) and 0.5 < z.std() < 2.0


def test_reward_margins_track_true_margins(reward):
    rm = margins.load_reward(reward)
    assert rm.image_cfg == train_clip.image_config()   # the build scored what scoring sees
    pairs = train_clip.draw_pairs(300, seed=12345)
    corr = train_clip.margin_correlation(train_clip.pair_scores(rm.ensure_model(), pairs),
                                         pairs["rewards"])
    assert corr["pearson"] > PEARSON_FLOOR and corr["spearman"] > SPEARMAN_FLOOR, corr
    assert corr["pearson"] < 0.99, corr   # a proxy, not the true reward


def test_base_samples_follow_their_prompts(base):
    prompts = [dict(text="one red circle on the left", colour="red", position="left"),
               dict(text="two blue squares on the right", colour="blue", position="right")]
    stats, images, rows = measure.sample_report(base, n_seeds=1, num_steps=10,
                                                prompts=prompts)
    assert images.shape == (2, 64, 64, 3)
    assert stats["blank"] == 0.0
    assert images.std(axis=(1, 2, 3)).min() > 10
    assert np.abs(images[0].astype(float) - images[1].astype(float)).mean() > 5


def test_classifier_reads_exact_renders():
    ref = measure.world_reference(n=70)
    assert ref["exact_renders"]["colour"] > 0.95 and ref["exact_renders"]["position"] > 0.9


@pytest.mark.slow
def test_quick_build_is_deterministic(tmp_path):
    first = build_models.build(str(tmp_path / "a"), preset="quick")
    second = build_models.build(str(tmp_path / "b"), preset="quick")
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert set(a) == set(b) and {"base/model_index.json", "reward/model.safetensors",
                                 "measurements.json"} <= set(a)
    assert a == b
    assert set(_tree_bytes(tmp_path / "a" / "base")) == set(_tree_bytes(
        build_models.DEFAULT_OUT + "/base"))
    assert first["reward"]["n_pairs"] == second["reward"]["n_pairs"] == 16


def test_unet_channels_widen_the_demo_base():
    from fifa_jax.demo import train_unet
    assert train_unet.unet_config() == train_unet.UNET_CONFIG
    wide = train_unet.init_unet(0, train_unet.unet_config(["64", "128"]))
    assert tuple(wide.config.block_out_channels) == (64, 128)
    assert tuple(train_unet.UNET_CONFIG["block_out_channels"]) == (32, 64)   # not mutated
    for bad in (["64"], [60, 128], [64, 0], ["wide", "128"]):
        with pytest.raises(ValueError, match="unet_channels"):
            train_unet.unet_config(bad)


@pytest.mark.slow
def test_quick_build_with_wider_unet(tmp_path):
    import json
    res = build_models.build(str(tmp_path), preset="quick", unet_channels=[16, 32])
    with open(tmp_path / "base" / "unet" / "config.json") as f:
        assert json.load(f)["block_out_channels"] == [16, 32]
    assert res["unet_channels"] == [16, 32]
