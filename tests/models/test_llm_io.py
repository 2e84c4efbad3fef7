"""Checkpoint reading, config parsing and FSDP sharding of the decoder LM."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from fifa_jax.models import llm_io
from fifa_jax.models.llm_config import from_hf_dict
from fifa_jax.models.llm_layers import rope_inv_freq
from fifa_jax.models.safetensors_io import CheckpointMismatchError

HF = {"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama"))
    cfg = from_hf_dict(HF)
    weights = llm_io.random_torch_weights(cfg, seed=0, std=0.2)
    llm_io.save_checkpoint(folder, HF, weights)
    return folder, weights


def _forward(model, ids, mask):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, i, m: (lambda mm: mm.logits(mm(i, m)))(nnx.merge(graphdef, s)))
    with jax.default_matmul_precision("highest"):
        return np.asarray(f(state, ids, mask))


def test_legacy_and_new_rope_forms_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = from_hf_dict(dict(HF, rope_theta=500.0, rope_scaling=scaling))
    new = from_hf_dict(dict({k: v for k, v in HF.items() if k != "rope_theta"},
                            rope_parameters=dict(scaling, rope_theta=500.0)))
    assert old == new
    assert old.rope_for("full_attention").rope_type == "llama3"
    g_old = from_hf_dict(dict(HF, model_type="gemma3_text", rope_theta=1e6,
                              rope_local_base_freq=1e4, sliding_window=4,
                              sliding_window_pattern=2, rope_scaling={"rope_type": "linear",
                                                                      "factor": 8.0}))
    assert g_old.layer_types == ("sliding_attention", "full_attention")
    assert g_old.rope_for("sliding_attention").theta == 1e4
    assert g_old.rope_for("full_attention").factor == 8.0
    assert g_old.norm_plus_one and g_old.qk_norm and g_old.embed_scale


def test_llama3_inv_freq_against_formula():
    from fifa_jax.models.llm_config import RopeConfig
    rope = RopeConfig(theta=500.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=64)
    got = rope_inv_freq(rope, 16)
    base = 1.0 / 500.0 ** (np.arange(0, 16, 2) / 16)
    want = []
    for f in base:       # slow, obvious reading of the llama3 rule
        wl = 2 * np.pi / f
        if wl < 64 / 4.0:
            want.append(f)
        elif wl > 64 / 1.0:
            want.append(f / 8.0)
        else:
            s = (64 / wl - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len({round(x / y, 6) for x, y in zip(got, base)}) == 3   # all three regimes hit


def test_unknown_family_and_bad_rope_named():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        from_hf_dict(dict(HF, model_type="gpt2"), "x/config.json")
    with pytest.raises(ValueError, match="yarn"):
        from_hf_dict(dict(HF, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_mismatch_names_keys(ckpt, tmp_path):
    folder, weights = ckpt
    bad = dict(weights)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    bad["model.norm.weight"] = np.zeros(31, np.float32)
    llm_io.save_checkpoint(str(tmp_path), HF, bad)
    with pytest.raises(CheckpointMismatchError) as e:
        llm_io.load_llm(str(tmp_path))
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.norm.weight" in msg


def test_sharded_index_bf16_and_fsdp(ckpt, tmp_path):
    """A sharded bf16 checkpoint loads; FSDP over 8 devices == one device."""
    folder, weights = ckpt
    keys = sorted(weights)
    half = len(keys) // 2
    import ml_dtypes
    from safetensors.numpy import save_file
    wmap = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: weights[k].astype(ml_dtypes.bfloat16) for k in part},
                  os.path.join(tmp_path, name), metadata={"format": "pt"})
        wmap.update({k: name for k in part})
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(HF, f)

    devices = np.array(jax.devices())
    single = llm_io.load_llm(folder, mesh=Mesh(devices[:1].reshape(1, 1), ("data", "fsdp")))
    fsdp = llm_io.load_llm(str(tmp_path), mesh=Mesh(devices.reshape(1, -1), ("data", "fsdp")))
    q = fsdp.model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == len(devices)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", None) or \
        q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    bf = weights["model.layers.0.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(q), bf.astype(np.float32).T)

    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), jnp.int32)
    want = _forward(single, ids, mask)
    # The bf16-rounded checkpoint differs a little; compare against a rounded single model.
    rounded = llm_io.load_llm(folder, mesh=Mesh(devices[:1].reshape(1, 1), ("data", "fsdp")))
    g, s = nnx.split(rounded)
    s = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)), s)
    got_single = _forward(nnx.merge(g, s), ids, mask)
    got_fsdp = _forward(fsdp, ids, mask)
    np.testing.assert_allclose(got_fsdp, got_single, atol=1e-5)
    assert np.max(np.abs(want - got_single)) > 0   # bf16 rounding really happened


def test_sharded_variant_index_name(ckpt, tmp_path):
    """transformers' sharded variant index `model.safetensors.index.fp16.json` is an index."""
    folder, weights = ckpt
    from safetensors.numpy import save_file
    keys = sorted(weights)
    wmap = {}
    for i, part in enumerate((keys[:3], keys[3:])):
        name = f"model.fp16-0000{i + 1}-of-00002.safetensors"
        save_file({k: weights[k].astype(np.float16) for k in part}, str(tmp_path / name),
                  metadata={"format": "pt"})
        wmap.update({k: name for k in part})
    with open(tmp_path / "model.safetensors.index.fp16.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(HF, f)
    model = llm_io.load_llm(str(tmp_path), variant="fp16")
    reader = llm_io.LazySafetensors(str(tmp_path / "model.safetensors.index.fp16.json"))
    assert set(reader.shapes()) == set(weights)
    key = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(reader.get(key), weights[key].astype(np.float16))
    np.testing.assert_array_equal(np.asarray(model.model.layers[1].mlp.up_proj.kernel[...]),
                                  weights[key].astype(np.float16).astype(np.float32).T)
    del wmap[keys[0]]
    wmap["model.not_there.weight"] = "model.fp16-00001-of-00002.safetensors"
    with open(tmp_path / "model.safetensors.index.fp16.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wmap}, f)
    with pytest.raises(CheckpointMismatchError, match="model.not_there.weight"):
        llm_io.LazySafetensors(str(tmp_path / "model.safetensors.index.fp16.json"))


def test_old_rotary_buffers_checked_and_skipped(ckpt, tmp_path):
    """Checkpoints from older transformers carry `rotary_emb.inv_freq` buffers: ones equal to
    the config's frequencies are skipped; a mismatch is an error naming the key."""
    folder, weights = ckpt
    cfg = from_hf_dict(HF)
    inv = rope_inv_freq(cfg.rope_for("full_attention"), cfg.head_dim)
    old = dict(weights)
    for i in range(HF["num_hidden_layers"]):
        old[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv
    llm_io.save_checkpoint(str(tmp_path / "ok"), HF, old)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 40, (2, 5)), jnp.int32)
    mask = jnp.ones((2, 5), jnp.int32)
    np.testing.assert_array_equal(_forward(llm_io.load_llm(str(tmp_path / "ok")), ids, mask),
                                  _forward(llm_io.load_llm(folder), ids, mask))
    old["model.layers.1.self_attn.rotary_emb.inv_freq"] = inv / 8.0    # a scaling not in config
    llm_io.save_checkpoint(str(tmp_path / "bad"), HF, old)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.self_attn\.rotary_emb"):
        llm_io.load_llm(str(tmp_path / "bad"))


def test_fsdp_spec_rule():
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(2, 4), ("data", "fsdp"))
    P = jax.sharding.PartitionSpec
    assert llm_io.fsdp_spec((64, 256), mesh) == P(None, "fsdp")
    assert llm_io.fsdp_spec((256, 30), mesh) == P("fsdp", None)
    assert llm_io.fsdp_spec((30, 31), mesh) == P()
    assert llm_io.fsdp_spec((256,), mesh) == P()


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_compute_logits_accumulate_and_stay_float32(tmp_path, tied):
    """With bfloat16 compute the output projection takes bf16 inputs but its logits are not
    rounded to bf16 (which would cost several percent of every next-token probability)."""
    hf = dict(HF, tie_word_embeddings=tied)
    cfg = from_hf_dict(hf)
    weights = llm_io.random_torch_weights(cfg, seed=1, std=0.5)
    llm_io.save_checkpoint(str(tmp_path), hf, weights)
    model = llm_io.load_llm(str(tmp_path), dtype=jnp.bfloat16)
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32)) * 4, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model.logits(hidden))
    w = weights["model.embed_tokens.weight" if tied else "lm_head.weight"]       # (V, D)
    w = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64)
    want = np.asarray(hidden, np.float64) @ w.T
    assert got.dtype == np.float32 and np.abs(want).max() > 8
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
