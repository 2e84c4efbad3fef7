"""The encode stage on a tiny SD pipeline and demo world: parity with diffusers/transformers,
flips, skipped pairs, resume, validation draw, report."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image

from fifa_jax.data.images import load_image
from fifa_jax.training import encode, pair_dataset
from tests.training.conftest import CORRUPT_RANK, K_PAIRS, RESOLUTION, encode_config


def _records(wd, split):
    src = pair_dataset.data_source(wd / "encode", "pairs", split)
    return [src[i] for i in range(len(src))]


def _refs(wd):
    pairs = pq.read_table(wd / "ingest" / "pairs.parquet").to_pydict()
    return {p: (w, l) for p, w, l in zip(pairs["pair_id"], pairs["winner_ref"],
                                         pairs["loser_ref"])}


def _torch_posterior(vae, pix):
    """diffusers' posterior of uint8 (H, W, 3) pixels preprocessed as ToTensor+Normalize."""
    x = torch.from_numpy(pix.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    return dist.mean[0].numpy(), dist.logvar[0].numpy()


def test_posteriors_match_diffusers_and_flips_are_mirrored_images(encoded, sd_pipe):
    wd, _, _ = encoded
    vae = sd_pipe[1]["vae"]
    refs = _refs(wd)
    recs = _records(wd, "train")[:3] + _records(wd, "validation")[:1]
    for rec in recs:
        for side, ref in zip("wl", refs[rec["pair_id"]]):
            pix = encode.preprocess_image(load_image(ref), RESOLUTION)
            for key, img in ((f"moments_{side}", pix),
                             (f"moments_{side}_flip", pix[:, ::-1].copy())):
                mean, logvar = _torch_posterior(vae, img)
                got = rec[key]
                assert got.shape == (8, RESOLUTION // 2, RESOLUTION // 2)
                assert np.max(np.abs(got[:4] - mean)) < 1e-4, key
                assert np.max(np.abs(got[4:] - logvar)) < 1e-4, key
        assert not np.allclose(rec["moments_w"], rec["moments_w_flip"])


def test_text_states_match_transformers(encoded, sd_pipe):
    wd, _, _ = encoded
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(str(sd_pipe[0] / "tokenizer"))
    model = sd_pipe[1]["text_encoder"]
    texts = pq.read_table(wd / "ingest" / "prompts.parquet").column("text").to_pylist()
    prompts = pair_dataset.data_source(wd / "encode", "prompts", "prompts")
    rows = [prompts[i] for i in range(len(prompts))]
    empty = pair_dataset.load_empty_prompt(wd / "encode")
    cases = [(texts[r["prompt_id"]], r["prompt_embeds"]) for r in rows[:3]]
    cases.append(("", empty["prompt_embeds"]))
    ids = tok([t for t, _ in cases], padding="max_length", max_length=12, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).last_hidden_state.numpy()
    for (_, got), w in zip(cases, want):
        assert got.shape == (12, 32) and np.max(np.abs(got - w)) < 1e-4
    assert "pooled" not in empty and "pooled" not in rows[0]
    # every pair's prompt_row points at its own prompt
    pid = dict(zip(*[pq.read_table(wd / "ingest" / "pairs.parquet").column(c).to_pylist()
                     for c in ("pair_id", "prompt_id")]))
    for rec in _records(wd, "train"):
        assert rows[rec["prompt_row"]]["prompt_id"] == pid[rec["pair_id"]]


def test_splits_report_and_skipped_pair(encoded):
    wd, summary, corrupt = encoded
    out = wd / "encode"
    report = json.loads((out / encode.REPORT).read_text())
    manifest = pq.read_table(wd / "select" / "manifest.parquet").column("pair_id").to_pylist()
    train = [r["pair_id"] for r in _records(wd, "train")]
    val = [r["pair_id"] for r in _records(wd, "validation")]
    assert train == [p for p in manifest if p != corrupt]          # rank order, corrupt gone
    assert manifest[CORRUPT_RANK] == corrupt
    assert summary["skipped_by_reason"] == {"undecodable image (winner)": 1}
    assert report["splits"]["train"] == {"pairs": K_PAIRS, "encoded": K_PAIRS - 1,
                                         "skipped": 1}
    assert len(val) == 10 and not set(val) & set(manifest) and val == sorted(val)
    assert report["validation"]["drawn_disjoint"] == 10           # enough disjoint ones here
    assert summary["latent_shape"] == [4, 8, 8] and report["flip"] is True
    spec = pair_dataset.read_spec(out)
    assert spec["scaling_factor"] == pytest.approx(0.18215)
    assert spec["splits"] == {"train": K_PAIRS - 1, "validation": 10}
    assert report["bytes"]["pairs"] > (K_PAIRS + 9) * 4 * 8 * 64 * 4   # 4 float32 moments
    # the dataset opens as a user would open it, with tfds alone
    builder = tfds.builder_from_directory(str(out / "tfds" / "fifa_dpo_pairs" / "1.0.0"))
    assert len(builder.as_data_source("train")) == K_PAIRS - 1
    assert builder.info.features["moments_w"].shape == (8, 8, 8)


def test_resume_after_a_kill_recomputes_nothing_finished(encoded, sd_pipe, tmp_path,
                                                         monkeypatch):
    wd, _, _ = encoded
    for stage in ("ingest", "select"):
        shutil.copytree(wd / stage, tmp_path / stage)
    cfg = encode_config(sd_pipe[0])
    monkeypatch.setenv(encode.FAIL_HOOK_ENV, "2")
    with pytest.raises(encode.SimulatedKill):
        encode.run(cfg, tmp_path)
    assert len(list((tmp_path / "encode" / "chunks").glob("*.npz"))) == 3  # 2 + text states
    monkeypatch.delenv(encode.FAIL_HOOK_ENV)
    cfg.encode.num_workers = 1                     # speed-only settings do not matter
    encode.run(cfg, tmp_path)
    chunks = json.loads((tmp_path / "encode" / encode.REPORT).read_text())["chunks"]
    assert chunks["chunks_reused"] == 2 and chunks["chunks_encoded"] == 3
    assert chunks["text_states_computed"] == 0
    assert chunks["images_encoded"] == 2 * (K_PAIRS - 16 + 10)
    for split in ("train", "validation"):
        a, b = _records(wd, split), _records(tmp_path, split)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    # a changed setting (here the stored dtype) drops the old chunks and recomputes
    cfg.encode.dtype = "float16"
    cfg.encode.random_flip = False
    encode.run(cfg, tmp_path)
    report = json.loads((tmp_path / "encode" / encode.REPORT).read_text())
    assert report["chunks"]["chunks_reused"] == 0 and report["chunks"]["chunks_encoded"] == 5
    rec = _records(tmp_path, "train")[0]
    assert rec["moments_w"].dtype == np.float16 and "moments_w_flip" not in rec
    np.testing.assert_allclose(rec["moments_w"], _records(wd, "train")[0]["moments_w"],
                               rtol=2e-3, atol=2e-3)
    encode.discard_resume_state(tmp_path)
    assert not (tmp_path / "encode" / "chunks").exists()


def test_validation_draw_policies(encoded):
    wd, _, _ = encoded
    inputs = encode.read_inputs(wd)
    train_prompts = set(inputs["prompt_id"][inputs["train_rows"]].tolist())
    a, info = encode.draw_validation(inputs, 30, seed=1, policy="disjoint")
    assert info["drawn"] == info["candidates_disjoint"] < 30       # all the disjoint ones
    assert not set(inputs["prompt_id"][a].tolist()) & train_prompts
    b, info_b = encode.draw_validation(inputs, 30, seed=1, policy="prefer_disjoint")
    assert len(b) == 30 and set(a) <= set(b) and info_b["drawn_disjoint"] == len(a)
    c, _ = encode.draw_validation(inputs, 30, seed=1, policy="any")
    c2, _ = encode.draw_validation(inputs, 30, seed=1, policy="any")
    d, _ = encode.draw_validation(inputs, 30, seed=2, policy="any")
    assert np.array_equal(c, c2) and not np.array_equal(c, d)
    assert not set(c.tolist()) & set(inputs["train_rows"].tolist())


def test_preprocess_resizes_the_short_side_and_centre_crops():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (41, 24, 3), dtype=np.uint8))
    got = encode.preprocess_image(img, 16)
    # short side 24 -> 16, long side int(16 * 41 / 24) = 27; top = round(5.5) = 6 (as
    # torchvision's CenterCrop: Python's round), left = 0
    want = np.asarray(img.resize((16, 27), Image.BILINEAR))[6:22]
    assert got.shape == (16, 16, 3) and np.array_equal(got, want)
    assert encode.center_crop_box(25, 16, 16) == (4, 0)            # round(4.5) = 4
    same = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(encode.preprocess_image(same, 16), np.asarray(same))


def test_config_errors_name_the_key(encoded, sd_pipe):
    from fifa_jax.errors import ConfigError
    wd, _, _ = encoded
    with pytest.raises(ConfigError, match="encode.dtype"):
        encode.run(encode_config(sd_pipe[0], dtype="bfloat16"), wd)
    with pytest.raises(ConfigError, match="encode.base_model"):
        encode.run(encode_config(""), wd)
    with pytest.raises(Exception, match="encode.resolution"):
        encode.run(encode_config(sd_pipe[0], resolution=15), wd)
    sig = encode.input_signature(encode_config(sd_pipe[0]), wd)
    assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in sig)
    assert any(k.endswith("model_index.json") for k in sig)
    assert set(encode.default_config().keys()) >= {"base_model", "resolution", "random_flip",
                                              "dtype", "vae_dtype", "batch_size",
                                              "chunk_size", "num_workers", "num_val_pairs",
                                              "variant"}
    assert set(encode.SPEED_ONLY) <= set(encode.default_config().keys())


def test_sdxl_text_states_are_penultimate_states_and_pooled_projection(tmp_path):
    import ml_collections
    import transformers as tf
    from fifa_jax import parallel
    from tests.models.test_clip_tokenizer import write_tiny_clip_tokenizer
    from tests.training.conftest import _text
    enc1 = _text(tmp_path, "text_encoder", tf.CLIPTextModel, 1)
    enc2 = _text(tmp_path, "text_encoder_2", tf.CLIPTextModelWithProjection, 2,
                 hidden_size=24, intermediate_size=29, hidden_act="gelu")
    write_tiny_clip_tokenizer(tmp_path / "tokenizer")
    write_tiny_clip_tokenizer(tmp_path / "tokenizer_2")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"]}))
    ec = ml_collections.ConfigDict(encode.default_config().to_dict())
    ec.batch_size = 1
    texts = ["a cat", "cab", "a b c a t cat cat cat a b c", ""]
    got = encode.text_states(texts, str(tmp_path), ec, parallel.make_mesh())
    from transformers import CLIPTokenizer
    ids = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))(
        texts, padding="max_length", max_length=12, truncation=True,
        return_tensors="pt").input_ids
    with torch.no_grad():
        o1 = enc1(ids, output_hidden_states=True)
        o2 = enc2(ids, output_hidden_states=True)
    want = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1).numpy()
    assert got["prompt_embeds"].shape == (4, 12, 56) and got["pooled"].shape == (4, 16)
    assert np.max(np.abs(got["prompt_embeds"] - want)) < 1e-4
    assert np.max(np.abs(got["pooled"] - o2.text_embeds.numpy())) < 1e-4
    assert got["truncated"].tolist() == [False, False, True, False]
