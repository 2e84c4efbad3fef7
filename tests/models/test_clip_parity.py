"""CLIP parity with transformers (torch CPU), both key conventions, round trip, strict loading.

Tiny random configs are built with transformers, saved with `save_pretrained` (5.x keys), also
rewritten as 4.x-style checkpoints (prefix + position_ids buffer), loaded with our loaders and
run on the same inputs: max abs error < 1e-4 in float32 at highest matmul precision.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from fifa_jax.models import clip_io
from fifa_jax.models.clip import (CLIPModel, CLIPTextModel, CLIPTextModelWithProjection,
                                  CLIPVisionModel, CLIPVisionModelWithProjection, clip_score,
                                  eos_positions)
from fifa_jax.models.safetensors_io import CheckpointMismatchError

ATOL = 1e-4
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=12, projection_dim=8,
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="quick_gelu")
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
              image_size=16, patch_size=4, projection_dim=8, hidden_act="gelu")
# EOS id 99 (the largest) ends each row; SD pads with the EOS id.
IDS = np.array([[0, 5, 7, 99, 99, 99, 99, 99],
                [0, 9, 12, 40, 3, 8, 99, 99]], np.int32)
# For the eos_token_id rule (eos = 50): rows also hold ids larger than the EOS id.
IDS_EOS50 = np.array([[98, 5, 50, 97, 1, 1, 1, 1],
                      [98, 99, 12, 40, 50, 1, 1, 1]], np.int32)
MASK_EOS50 = (np.arange(8)[None] <= np.array([[3], [4]])).astype(np.int32)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            if name.endswith("logit_scale"):
                p.fill_(2.0)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def _to_v4(src_dir, dst_dir, prefix, positions):
    """Rewrite a 5.x checkpoint as 4.x wrote it: key prefix + persistent position_ids."""
    os.makedirs(dst_dir, exist_ok=True)
    tensors = {prefix + k: v for k, v in load_file(os.path.join(src_dir, "model.safetensors")).items()}
    tensors[prefix + "embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src_dir, "config.json")) as f, \
            open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())


def _jit(model, fn):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: jax.tree.map(np.asarray, f(state, *a))


def _close(ours, theirs, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape, what
    err = float(np.max(np.abs(np.asarray(ours, np.float32) - theirs)))
    assert err < ATOL, f"{what}: max abs err {err}"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    tcfg = tf.CLIPTextConfig(**TEXT)
    tcfg50 = tf.CLIPTextConfig(**{**TEXT, "eos_token_id": 50, "bos_token_id": 98,
                                  "hidden_act": "gelu"})
    vcfg = tf.CLIPVisionConfig(**VISION)
    models = {
        "text": _randomize(tf.CLIPTextModel(tcfg), 1),
        "text_proj": _randomize(tf.CLIPTextModelWithProjection(tcfg50), 2),
        "vision": _randomize(tf.CLIPVisionModel(vcfg), 3),
        "vision_proj": _randomize(tf.CLIPVisionModelWithProjection(vcfg), 4),
        "clip": _randomize(tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                      projection_dim=8)), 5),
    }
    dirs = {}
    for name, m in models.items():
        dirs[name] = str(root / name)
        m.save_pretrained(dirs[name])
    dirs["text_v4"] = str(root / "text_v4")
    _to_v4(dirs["text"], dirs["text_v4"], "text_model.", TEXT["max_position_embeddings"])
    dirs["vision_v4"] = str(root / "vision_v4")
    _to_v4(dirs["vision"], dirs["vision_v4"], "vision_model.", 17)
    pixels = np.random.RandomState(0).randn(3, 3, 16, 16).astype(np.float32)
    return models, dirs, pixels


def _text_fn(m, ids):
    return m(ids, output_hidden_states=True)


@pytest.mark.parametrize("style", ["text", "text_v4"])
def test_text_model_parity(ckpts, style):
    models, dirs, _ = ckpts
    ours = clip_io.load_text_encoder(dirs[style])
    assert type(ours) is CLIPTextModel
    with jax.default_matmul_precision("highest"):
        out = _jit(ours, _text_fn)(IDS)
    with torch.no_grad():
        ref = models["text"](torch.tensor(IDS, dtype=torch.long), output_hidden_states=True)
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    _close(out.pooled, ref.pooler_output, "pooled")
    assert len(out.hidden_states) == TEXT["num_hidden_layers"] + 1 == len(ref.hidden_states)
    _close(out.hidden_states[-2], ref.hidden_states[-2], "penultimate hidden state")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


def test_text_projection_parity_eos_rule_and_mask(ckpts):
    models, dirs, _ = ckpts
    ours = clip_io.load_text_encoder(dirs["text_proj"])
    assert type(ours) is CLIPTextModelWithProjection
    assert ours.config.eos_token_id == 50
    with jax.default_matmul_precision("highest"):
        out = _jit(ours, lambda m, i, a: m(i, a, output_hidden_states=True))(IDS_EOS50,
                                                                              MASK_EOS50)
    with torch.no_grad():
        ref = models["text_proj"](torch.tensor(IDS_EOS50, dtype=torch.long),
                                  attention_mask=torch.tensor(MASK_EOS50),
                                  output_hidden_states=True)
    _close(out.text_embeds, ref.text_embeds, "text_embeds")
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    _close(out.hidden_states[-2], ref.hidden_states[-2], "penultimate hidden state")


def test_eos_positions_rules():
    ids = np.array([[0, 7, 9, 3, 9], [5, 2, 8, 2, 1], [4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(eos_positions(jnp.asarray(ids), 2), [2, 2, 0])   # argmax
    np.testing.assert_array_equal(eos_positions(jnp.asarray(ids), 9), [2, 0, 0])   # first 9
    np.testing.assert_array_equal(eos_positions(jnp.asarray(ids), 4), [0, 0, 0])


@pytest.mark.parametrize("style", ["vision", "vision_v4"])
def test_vision_model_parity(ckpts, style):
    models, dirs, pixels = ckpts
    ours = clip_io.load_vision_encoder(dirs[style])
    assert type(ours) is CLIPVisionModel
    with jax.default_matmul_precision("highest"):
        out = _jit(ours, lambda m, p: m(p, output_hidden_states=True))(pixels)
    with torch.no_grad():
        ref = models["vision"](torch.tensor(pixels), output_hidden_states=True)
    _close(out.pooled, ref.pooler_output, "pooled")
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


def test_vision_projection_parity(ckpts):
    models, dirs, pixels = ckpts
    ours = clip_io.load_vision_encoder(dirs["vision_proj"])
    assert type(ours) is CLIPVisionModelWithProjection
    with jax.default_matmul_precision("highest"):
        out = _jit(ours, lambda m, p: m(p))(pixels)
    with torch.no_grad():
        ref = models["vision_proj"](torch.tensor(pixels))
    _close(out.image_embeds, ref.image_embeds, "image_embeds")


@pytest.fixture(scope="module")
def clip_pair(ckpts):
    models, dirs, pixels = ckpts
    return clip_io.load_clip(dirs["clip"]), models["clip"], pixels


def test_clip_score_parity(clip_pair):
    ours, ref_model, pixels = clip_pair
    assert type(ours) is CLIPModel

    def fn(m, ids, px):
        return (m.logits(ids, px), m.get_text_features(ids), m.get_image_features(px),
                m.score(ids, px[:2]))
    with jax.default_matmul_precision("highest"):
        logits, tfeat, ifeat, score = _jit(ours, fn)(IDS, pixels)
    ids_t, px_t = torch.tensor(IDS, dtype=torch.long), torch.tensor(pixels)
    with torch.no_grad():
        ref = ref_model(input_ids=ids_t, pixel_values=px_t)
        ref_t = ref_model.get_text_features(input_ids=ids_t).pooler_output
        ref_i = ref_model.get_image_features(pixel_values=px_t).pooler_output
    _close(logits, ref.logits_per_image, "logits_per_image")
    _close(tfeat, ref_t, "get_text_features")
    _close(ifeat, ref_i, "get_image_features")
    _close(score, torch.diagonal(ref.logits_per_image[:2]), "score (row-wise)")
    _close(np.asarray(clip_score(tfeat, ifeat[:2], 2.0)), np.diagonal(logits[:2]),
           "clip_score on features")


def test_clip_score_sharded_equals_single_device(clip_pair):
    ours, _, pixels = clip_pair
    devices = jax.devices()
    n = len(devices)
    ids = np.tile(IDS, (n // 2, 1))
    px = np.tile(pixels[:2], (n // 2, 1, 1, 1))
    mesh = Mesh(np.array(devices), ("data",))
    graphdef, state = nnx.split(ours)
    f = jax.jit(lambda s, i, p: nnx.merge(graphdef, s).score(i, p))
    with jax.default_matmul_precision("highest"):
        single = np.asarray(f(state, ids, px))
        rep = jax.device_put(state, NamedSharding(mesh, P()))
        sharded = f(rep, jax.device_put(ids, NamedSharding(mesh, P("data"))),
                    jax.device_put(px, NamedSharding(mesh, P("data"))))
    assert len(sharded.sharding.device_set) == n
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)


def test_bf16_compute_keeps_float32_params(ckpts, clip_pair):
    _, dirs, pixels = ckpts
    ours32 = clip_pair[0]
    ours16 = clip_io.load_clip(dirs["clip"], dtype=jnp.bfloat16, attention_impl="xla")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(ours16, nnx.Param))} == {np.dtype(np.float32)}
    assert all(m.attention_impl == "xla" for _, m in nnx.iter_graph(ours16)
               if hasattr(m, "attention_impl"))
    feats = _jit(ours16, lambda m, i: m.get_text_features(i))(IDS)
    assert feats.dtype == jnp.bfloat16
    s16 = _jit(ours16, lambda m, i, p: m.score(i, p))(IDS, pixels[:2])
    s32 = _jit(ours32, lambda m, i, p: m.score(i, p))(IDS, pixels[:2])
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, atol=0.15)


# ---------------------------------------------------------------- round trip ---------------

@pytest.mark.parametrize("name,cls,key_style", [
    ("text", tf.CLIPTextModel, "hub"),
    ("text", tf.CLIPTextModel, "v5"),
    ("text_proj", tf.CLIPTextModelWithProjection, "hub"),
    ("vision", tf.CLIPVisionModel, "v5"),
    ("vision_proj", tf.CLIPVisionModelWithProjection, "hub"),
    ("clip", tf.CLIPModel, "hub"),
])
def test_round_trip_to_transformers(ckpts, tmp_path, name, cls, key_style):
    models, dirs, pixels = ckpts
    loader = {"text": clip_io.load_text_encoder, "text_proj": clip_io.load_text_encoder,
              "vision": clip_io.load_vision_encoder, "vision_proj": clip_io.load_vision_encoder,
              "clip": clip_io.load_clip}[name]
    ours = loader(dirs[name])
    out_dir = str(tmp_path / "saved")
    if name == "clip":
        clip_io.save_clip(ours, out_dir)
    elif name.startswith("text"):
        clip_io.save_text_encoder(ours, out_dir, key_style=key_style)
    else:
        clip_io.save_vision_encoder(ours, out_dir, key_style=key_style)
    written = set(load_file(os.path.join(out_dir, "model.safetensors")))
    original = set(load_file(os.path.join(dirs[name], "model.safetensors")))
    if key_style == "hub" and name in ("text", "vision"):
        prefix = {"text": "text_model.", "vision": "vision_model."}[name]
        assert written == {prefix + k for k in original}
    else:
        assert written == original
    reloaded = cls.from_pretrained(out_dir).eval()
    ref_sd, new_sd = models[name].state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    if name == "clip":
        ids_t, px_t = torch.tensor(IDS, dtype=torch.long), torch.tensor(pixels)
        with torch.no_grad():
            a = models[name](input_ids=ids_t, pixel_values=px_t).logits_per_image
            b = reloaded(input_ids=ids_t, pixel_values=px_t).logits_per_image
        assert torch.equal(a, b)
    again = loader(out_dir)   # and ours reads its own output back
    for x, y in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)),
                    jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_transformers_reads_our_v4_rewrite_identically(ckpts):
    """Our 4.x-style fixture is what transformers itself accepts as the legacy layout."""
    models, dirs, _ = ckpts
    legacy = tf.CLIPTextModel.from_pretrained(dirs["text_v4"]).eval()
    for k, v in models["text"].state_dict().items():
        assert torch.equal(v, legacy.state_dict()[k]), k


# ---------------------------------------------------------------- strict loading -----------

def _write(tmp_path, src_dir, tensors):
    out = tmp_path / "bad"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src_dir, "config.json")) as f:
        (out / "config.json").write_text(f.read())
    return str(out)


def test_strict_renamed_key_is_named(ckpts, tmp_path):
    _, dirs, _ = ckpts
    t = load_file(os.path.join(dirs["text"], "model.safetensors"))
    t["encoder.layers.1.mlp.fc_1.weight"] = t.pop("encoder.layers.1.mlp.fc1.weight")
    with pytest.raises(CheckpointMismatchError) as e:
        clip_io.load_text_encoder(_write(tmp_path, dirs["text"], t))
    assert "encoder.layers.1.mlp.fc1.weight" in str(e.value)       # missing
    assert "encoder.layers.1.mlp.fc_1.weight" in str(e.value)      # unexpected


def test_strict_wrong_shape_is_named(ckpts, tmp_path):
    _, dirs, _ = ckpts
    t = load_file(os.path.join(dirs["clip"], "model.safetensors"))
    t["visual_projection.weight"] = np.zeros((8, 25), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape for visual_projection\.weight"):
        clip_io.load_clip(_write(tmp_path, dirs["clip"], t))


def test_strict_mixed_prefixes_fail(ckpts, tmp_path):
    _, dirs, _ = ckpts
    t = load_file(os.path.join(dirs["text"], "model.safetensors"))
    t["text_model.final_layer_norm.bias"] = t.pop("final_layer_norm.bias")
    with pytest.raises(CheckpointMismatchError, match=r"final_layer_norm\.bias"):
        clip_io.load_text_encoder(_write(tmp_path, dirs["text"], t))


def test_loader_refuses_wrong_config_kind(ckpts):
    _, dirs, _ = ckpts
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        clip_io.load_clip(dirs["text"])
    with pytest.raises(ValueError, match="not a CLIPTextConfig"):
        clip_io.load_text_encoder(dirs["vision"])


def test_legacy_pytorch_bin_is_read(ckpts, tmp_path):
    """A folder with only pytorch_model.bin (4.x keys + position_ids) loads the same params."""
    models, dirs, _ = ckpts
    sd = {"text_model." + k: v for k, v in models["text"].state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    torch.save(sd, str(tmp_path / "pytorch_model.bin"))
    with open(os.path.join(dirs["text"], "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    from_bin = clip_io.load_text_encoder(str(tmp_path))
    from_st = clip_io.load_text_encoder(dirs["text"])
    for x, y in zip(jax.tree.leaves(nnx.state(from_bin, nnx.Param)),
                    jax.tree.leaves(nnx.state(from_st, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("hw,p", [((28, 28), 14), ((30, 33), 7)])
def test_patch_embed_equals_the_strided_convolution(hw, p):
    """The vision tower's patch matmul equals a stride-p VALID convolution (remainder rows and
    columns dropped as the convolution drops them)."""
    from fifa_jax.models.clip import patch_embed
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2,) + hw + (3,)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(p, p, 3, 16)), jnp.float32)
    conv = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)
    got = patch_embed(x, kernel)
    assert got.shape == (2, (hw[0] // p) * (hw[1] // p), 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(conv).reshape(got.shape),
                               rtol=1e-5, atol=1e-4)
