"""Margins: equal to transformers' CLIP on the processor's pixels; 8 devices == 1 device bit
for bit (float32 and bfloat16); a killed run resumes without rescoring; a rewritten image shard
is rescored; undecodable images are flagged and counted; no pairs give an empty table."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fifa_jax import parallel
from fifa_jax.demo import reward as demo_reward
from fifa_jax.scoring import margins

N_PAIRS = 11
CHUNK = 3  # -> 4 chunks, the last one partial


def reward_cfg(path, **kw):
    d = dict(path=str(path), processor_path="", batch_size=4, chunk_size=CHUNK, num_workers=3,
             dtype="float32")
    d.update(kw)
    return ml_collections.ConfigDict(d)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny reward + 11 pairs over 4 prompts; images of odd sizes, one RGBA, one corrupt,
    three stored as bytes inside a parquet file."""
    root = tmp_path_factory.mktemp("margins_world")
    reward = demo_reward.build_demo_reward(root / "reward")
    rng = np.random.default_rng(0)
    refs = []
    blobs = []
    for i in range(2 * N_PAIRS):
        h, w = rng.integers(20, 70, 2)
        if i == 5:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i in (2, 9, 16):
            import io
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            blobs.append(buf.getvalue())
            refs.append(None)
        else:
            p = root / f"img{i}.png"
            img.save(p)
            refs.append(str(p))
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), root / "blobs.parquet")
    for j, i in enumerate((2, 9, 16)):
        refs[i] = f"{root / 'blobs.parquet'}::{j}::jpg"
    bad = root / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    refs[13] = str(bad)  # pair 6, loser
    texts = ["a photo of a cat", "a red castle at night, highly detailed",
             "watercolor painting of a forest", "a " + "very " * 60 + "long prompt"]
    pairs = pa.table({"pair_id": pa.array(np.arange(N_PAIRS), pa.int64()),
                      "prompt_id": pa.array(rng.integers(0, 4, N_PAIRS), pa.int64()),
                      "winner_ref": refs[0::2], "loser_ref": refs[1::2]})
    return {"root": root, "reward": reward, "pairs": pairs, "texts": texts, "refs": refs}


def _mesh(n):
    return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}),
                              devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def run8(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("m8")
    summary = margins.compute_margins(world["pairs"], world["texts"], reward_cfg(world["reward"]),
                                      _mesh(8), out)
    return summary, pq.read_table(out / "margins.parquet"), out


def test_matches_transformers_reference(world, run8):
    import torch
    from transformers import CLIPModel
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    from fifa_jax.data.images import load_image_bytes
    import io
    _, table, _ = run8
    model = CLIPModel.from_pretrained(world["reward"]).eval()
    proc = Proc.from_pretrained(world["reward"])
    tok = margins.embeddings.load_tokenizer(world["reward"])
    rows = table.to_pylist()
    pairs = world["pairs"].to_pylist()
    for r, p in zip(rows, pairs):
        if not r["ok"]:
            continue
        text = world["texts"][p["prompt_id"]]
        enc = tok([text], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt")
        imgs = [Image.open(io.BytesIO(load_image_bytes(ref))) for ref in
                (p["winner_ref"], p["loser_ref"])]
        pix = torch.tensor(proc(images=imgs, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                        pixel_values=pix)
        want = out.logits_per_image[:, 0].numpy()
        np.testing.assert_allclose([r["score_w"], r["score_l"]], want, atol=2e-4, rtol=0)
        assert r["margin_signed"] == pytest.approx(r["score_w"] - r["score_l"], abs=1e-6)
        assert r["margin_abs"] == pytest.approx(abs(r["score_w"] - r["score_l"]), abs=1e-6)


def test_failures_flagged_and_counted(run8):
    summary, table, _ = run8
    ok = table.column("ok").to_pylist()
    assert ok[6] is False and sum(ok) == N_PAIRS - 1
    reason = table.column("failure_reason").to_pylist()[6]
    assert reason.startswith("undecodable image (loser)") and "corrupt.png" in reason
    assert summary["failures"] == {"undecodable image (loser)": 1}
    assert summary["pairs_failed"] == 1
    for col in ("score_w", "score_l", "margin_signed", "margin_abs"):
        assert np.all(np.isfinite(table.column(col).to_numpy()))
    assert table.column("score_w").to_pylist()[6] == 0.0


def test_truncated_prompt_counted(world, run8):
    summary, _, _ = run8
    used = set(world["pairs"].column("prompt_id").to_pylist())
    assert summary["reward_prompts_truncated"] == int(3 in used)


def test_one_device_equals_eight(world, run8, tmp_path):
    _, table8, _ = run8
    summary = margins.compute_margins(world["pairs"], world["texts"],
                                      reward_cfg(world["reward"]), _mesh(1), tmp_path)
    table1 = pq.read_table(tmp_path / "margins.parquet")
    assert table1.column("ok").to_pylist() == table8.column("ok").to_pylist()
    for col in ("score_w", "score_l", "margin_signed", "margin_abs"):  # batch_size is per device
        np.testing.assert_array_equal(table1.column(col).to_numpy(), table8.column(col).to_numpy(),
                                      err_msg=col)
    assert summary["chunks_scored"] == 4


def test_rerun_reuses_every_chunk(world, run8):
    _, table, out = run8
    summary = margins.compute_margins(world["pairs"], world["texts"],
                                      reward_cfg(world["reward"]), _mesh(8), out)
    assert summary["chunks_reused"] == 4 and summary["chunks_scored"] == 0
    assert summary["images_scored"] == 0 and summary["text_features_computed"] == 0
    assert pq.read_table(out / "margins.parquet").equals(table)


_CHILD = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[4])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    import ml_collections, pyarrow.parquet as pq
    from pathlib import Path
    from fifa_jax import parallel
    from fifa_jax.scoring import margins
    world = json.loads(open(sys.argv[1]).read())
    cfg = ml_collections.ConfigDict(world["cfg"])
    summary = margins.compute_margins(pq.read_table(sys.argv[2]), world["texts"], cfg,
                                      parallel.make_mesh(), Path(sys.argv[3]))
    print("SUMMARY" + json.dumps(summary))
""")


def _child(world, out, exit_after):
    spec = world["root"] / "child.json"
    spec.write_text(json.dumps({"cfg": reward_cfg(world["reward"]).to_dict(),
                                "texts": world["texts"]}))
    pq.write_table(world["pairs"], world["root"] / "pairs.parquet")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop(margins.EXIT_HOOK_ENV, None)
    if exit_after:
        env[margins.EXIT_HOOK_ENV] = str(exit_after)
    cache = os.environ.get("FIFA_JAX_TEST_CACHE", os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(__file__))), ".jax_cache"))
    return subprocess.run([sys.executable, "-c", _CHILD, str(spec),
                           str(world["root"] / "pairs.parquet"), str(out), cache],
                          env=env, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_without_rescoring(world, run8, tmp_path):
    _, table8, _ = run8
    first = _child(world, tmp_path, exit_after=2)
    assert first.returncode == 75, first.stderr[-3000:]
    chunk_files = sorted((tmp_path / margins.CHUNK_DIR).glob("chunk_*.parquet"))
    assert [p.name for p in chunk_files] == ["chunk_00000.parquet", "chunk_00001.parquet"]
    assert not (tmp_path / "margins.parquet").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in chunk_files}
    second = _child(world, tmp_path, exit_after=0)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.split("SUMMARY", 1)[1])
    assert summary["chunks_reused"] == 2 and summary["chunks_scored"] == 2
    assert summary["images_scored"] == 2 * (N_PAIRS - 2 * CHUNK)  # only chunks 2 and 3
    assert summary["text_features_computed"] == 0  # the first run's text features are reused
    for name, t in mtimes.items():
        assert (tmp_path / margins.CHUNK_DIR / name).stat().st_mtime_ns == t
    resumed = pq.read_table(tmp_path / "margins.parquet")
    assert resumed.column("ok").to_pylist() == table8.column("ok").to_pylist()
    for col in ("score_w", "score_l", "margin_signed", "margin_abs"):
        np.testing.assert_array_equal(resumed.column(col).to_numpy(),
                                      table8.column(col).to_numpy(), err_msg=col)


def test_changed_inputs_discard_old_chunks(world, tmp_path):
    cfg = reward_cfg(world["reward"])
    pairs = world["pairs"].slice(0, 4)
    margins.compute_margins(pairs, world["texts"], cfg, _mesh(8), tmp_path)
    swapped = pairs.set_column(2, "winner_ref", pairs.column("loser_ref"))
    s = margins.compute_margins(swapped, world["texts"], cfg, _mesh(8), tmp_path)
    assert s["chunks_reused"] == 0 and s["chunks_scored"] == 2


@pytest.fixture(scope="module")
def bf16_reward(world):
    return margins.load_reward(world["reward"], "bfloat16")


def _bf16_table(world, reward, n_devices, out):
    margins.compute_margins(world["pairs"], world["texts"],
                            reward_cfg(world["reward"], dtype="bfloat16"), _mesh(n_devices),
                            out, reward=reward)
    return pq.read_table(out / "margins.parquet")


def test_bfloat16_close_to_float32(world, run8, bf16_reward, tmp_path):
    from flax import nnx
    import jax.numpy as jnp
    reward = bf16_reward
    state = margins.cast_matrices(nnx.state(reward.ensure_model()), jnp.bfloat16)
    leaves = jax.tree.leaves(state)
    assert {x.dtype for x in leaves if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in leaves if x.ndim < 2} == {jnp.dtype(jnp.float32)}  # logit_scale
    _, table8, _ = run8
    got = _bf16_table(world, reward, 8, tmp_path / "bf16_8")
    one = _bf16_table(world, reward, 1, tmp_path / "bf16_1")
    for col in ("score_w", "score_l", "margin_signed"):  # bf16 is as device-count free as f32
        np.testing.assert_array_equal(one.column(col).to_numpy(), got.column(col).to_numpy(),
                                      err_msg=col)
    want = table8.column("score_w").to_numpy()
    err = np.abs(got.column("score_w").to_numpy() - want)
    # bf16 compute: about 1% of the score range here (0.57 of 52); a wrong scale or tower
    # would be off by tens.
    assert err.max() < 0.03 * np.abs(want).max(), err


def test_changed_tokenizer_in_processor_path_discards_old_chunks(world, tmp_path):
    """The tokenizer may come from processor_path, outside the fingerprinted reward folder: a
    different tokenizer gives different text features, so finished chunks must not be reused."""
    import shutil
    cfg = reward_cfg(world["reward"])
    pairs = world["pairs"].slice(0, 4)
    out = tmp_path / "out"
    margins.compute_margins(pairs, world["texts"], cfg, _mesh(8), out)
    proc = tmp_path / "processor"
    proc.mkdir()
    shutil.copy(os.path.join(world["reward"], "preprocessor_config.json"), proc)
    for name, data in demo_reward.tokenizer_files(n_merges=20).items():
        (proc / name).write_bytes(data)
    s = margins.compute_margins(pairs, world["texts"],
                                reward_cfg(world["reward"], processor_path=str(proc)),
                                _mesh(8), out)
    assert s["chunks_reused"] == 0 and s["chunks_scored"] == 2
    assert s["text_features_computed"] == len(world["texts"])


def _shard_world(world, root):
    """The first 6 pairs (2 chunks) with their parquet-stored images in a copy of the shard
    under `root` (pairs 1 and 4 point into it)."""
    import shutil
    shard = root / "shard.parquet"
    shutil.copy(world["root"] / "blobs.parquet", shard)
    old = str(world["root"] / "blobs.parquet")
    pairs = world["pairs"].slice(0, 6)
    for col in ("winner_ref", "loser_ref"):
        refs = [r.replace(old, str(shard)) for r in pairs.column(col).to_pylist()]
        pairs = pairs.set_column(pairs.schema.get_field_index(col), col, pa.array(refs))
    return pairs, shard


def test_shard_rewritten_in_place_is_rescored(world, tmp_path):
    """Same refs, other bytes: the chunk fingerprint covers the shard's size and mtime."""
    import io
    pairs, shard = _shard_world(world, tmp_path)
    cfg, out = reward_cfg(world["reward"]), tmp_path / "out"
    first = margins.compute_margins(pairs, world["texts"], cfg, _mesh(8), out)
    assert first["chunks_scored"] == 2
    before = pq.read_table(out / "margins.parquet")
    again = margins.compute_margins(pairs, world["texts"], cfg, _mesh(8), out)
    assert again["chunks_reused"] == 2 and again["chunks_scored"] == 0  # untouched: reused
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(pq.read_table(shard).num_rows):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"jpg": pa.array(blobs, pa.binary())}), shard)  # in place
    after = margins.compute_margins(pairs, world["texts"], cfg, _mesh(8), out)
    assert after["chunks_reused"] == 0 and after["chunks_scored"] == 2
    table = pq.read_table(out / "margins.parquet")
    w0, w1 = before.column("score_w").to_numpy(), table.column("score_w").to_numpy()
    l0, l1 = before.column("score_l").to_numpy(), table.column("score_l").to_numpy()
    assert w1[1] != w0[1] and l1[4] != l0[4]  # the images stored in the shard
    np.testing.assert_array_equal(np.delete(w1, 1), np.delete(w0, 1))
    np.testing.assert_array_equal(np.delete(l1, 4), np.delete(l0, 4))


def test_no_pairs_give_an_empty_table(world, tmp_path):
    empty = world["pairs"].slice(0, 0)
    for texts in ([], world["texts"]):
        out = tmp_path / f"out{len(texts)}"
        s = margins.compute_margins(empty, texts, reward_cfg(world["reward"]), _mesh(8), out)
        assert s["pairs"] == 0 and s["pairs_ok"] == 0 and s["chunks_total"] == 0
        table = pq.read_table(out / "margins.parquet")
        assert table.num_rows == 0 and "margin_signed" in table.column_names
