"""The demo base pipeline: the shipped pretrained files install byte for byte without touching
mtimes, load in our pipeline loader and in diffusers, generate a 64 x 64 image, and give
unit-scale latents."""
import math
import os

import numpy as np
import pytest
import torch

from fifa_jax.models.pipeline import load_pipeline
from fifa_jax.models.unet_io import unet_name_map
from fifa_jax.demo.base import SHIPPED, build_demo_base, init_tensors

FILES = {"model_index.json", "scheduler/scheduler_config.json",
         "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
         "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/config.json", "text_encoder/model.safetensors",
         "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
         "tokenizer/special_tokens_map.json"}


def snapshot(folder) -> dict:
    """relative path -> (bytes, mtime_ns) of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_demo_base(tmp_path_factory.mktemp("demo") / "base")


def test_files_complete_and_small(base):
    snap = snapshot(base)
    assert set(snap) == FILES
    assert sum(len(b) for b, _ in snap.values()) < 20_000_000


def test_rebuild_is_byte_identical_and_keeps_mtimes(base, tmp_path):
    before = snapshot(base)
    build_demo_base(base)
    assert snapshot(base) == before
    fresh = {k: b for k, (b, _) in snapshot(build_demo_base(tmp_path / "again")).items()}
    assert fresh == {k: b for k, (b, _) in before.items()}
    shipped = {k: b for k, (b, _) in snapshot(SHIPPED).items()}
    assert fresh == shipped
    with pytest.raises(ValueError, match="only seed 0 is shipped"):
        build_demo_base(tmp_path / "s1", seed=1)


def test_changed_file_is_rewritten(base, tmp_path):
    folder = build_demo_base(tmp_path / "b")
    path = os.path.join(folder, "unet", "config.json")
    with open(path, "w") as f:
        f.write("{}")
    build_demo_base(folder)
    assert snapshot(folder)["unet/config.json"][0] == snapshot(base)["unet/config.json"][0]


def test_init_tensors_follow_pytorch_default_scales():
    names = {"lin.weight": (("lin", "kernel"), "linear", (6, 50)),
             "lin.bias": (("lin", "bias"), "same", (6,)),
             "conv.weight": (("conv", "kernel"), "conv", (8, 4, 3, 3)),
             "conv.bias": (("conv", "bias"), "same", (8,)),
             "norm.weight": (("norm", "scale"), "same", (8,)),
             "norm.bias": (("norm", "bias"), "same", (8,)),
             "tok.weight": (("tok", "embedding"), "same", (300, 40))}
    t = init_tensors(names, np.random.default_rng(0))
    assert {k: v.shape for k, v in t.items()} == {k: v[2] for k, v in names.items()}
    for key, fan_in in (("lin.weight", 50), ("lin.bias", 50), ("conv.weight", 36),
                        ("conv.bias", 36)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(t[key]).max() <= bound and np.abs(t[key]).max() > 0.6 * bound, key
    np.testing.assert_array_equal(t["norm.weight"], np.ones(8, np.float32))
    np.testing.assert_array_equal(t["norm.bias"], np.zeros(8, np.float32))
    assert 0.018 < t["tok.weight"].std() < 0.022
    with pytest.raises(ValueError, match="no rule for parameter odd.weight"):
        init_tensors({"odd.weight": (("odd", "thing"), "same", (3,))}, np.random.default_rng(0))


def test_loads_with_our_pipeline(base):
    pipe = load_pipeline(base)
    assert pipe.unet is not None and pipe.vae is not None and pipe.text_encoder is not None
    assert pipe.skipped == ()
    assert pipe.scheduler_config["_class_name"] == "PNDMScheduler"
    unet_cfg = pipe.unet.config
    assert unet_cfg.cross_attention_dim[0] == pipe.text_encoder.config.hidden_size
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    ids = pipe.tokenizer(["two red circles on the left"], padding="max_length",
                         max_length=77).input_ids
    assert len(ids[0]) == 77 and max(ids[0]) < pipe.text_encoder.config.vocab_size


def test_vae_latents_of_demo_images_are_unit_scale(base):
    from fifa_jax.demo import world as dw
    pipe = load_pipeline(base, components=["vae"])
    rng = np.random.default_rng(0)
    colours, positions = list(dw.COLOURS), list(dw.POSITIONS)
    ims = [np.asarray(dw.render(dict(colour=colours[i % len(colours)], shape=dw.SHAPES[i % 4],
                                     count=1 + i % 3, position=positions[i % len(positions)],
                                     aesthetic=0.8), 64, rng), np.float32) / 127.5 - 1
           for i in range(16)]
    post = pipe.vae.encode(np.transpose(np.stack(ims), (0, 3, 1, 2)))
    z = np.asarray(pipe.vae.scale_latents(post.mean))
    assert z.shape == (16, 4, 16, 16)
    assert 0.5 < z.std() < 2.0, z.std()
    assert float(np.asarray(post.std).mean()) < 0.5 * float(np.asarray(post.mean).std())


def test_diffusers_loads_and_generates(base):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    n_torch = sum(p.numel() for p in pipe.unet.parameters())
    ours = load_pipeline(base, components=["unet"]).unet
    assert n_torch == sum(int(np.prod(s)) for _, _, s in unet_name_map(ours).values())
    out = pipe("two red circles on the left", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    img = out.images
    assert img.shape == (1, 64, 64, 3)
    assert np.isfinite(img).all() and img.std() > 0.01
