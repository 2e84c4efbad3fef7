"""The demo world: deterministic, reused when unchanged, a true reward that labels follow,
drawings that follow the prompt, a harmful mark that costs true reward but draws human
labels, and an ingest that reads it with the Pick-a-Pic reader."""
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import ndimage

from fifa_jax.data import images, ingest
from fifa_jax.demo import world as demo_world
from tests.data import _util

SMALL = dict(n_prompts=30, n_pairs=240, image_size=32, rows_per_shard=100, row_group_rows=25,
             n_corrupt=3)


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d)
                  for r, _, fs in os.walk(d) for f in fs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    info = demo_world.write_demo_world(d, seed=3, **SMALL)
    return d, info


def test_same_seed_same_bytes(world, tmp_path):
    d, info = world
    assert not info["reused"] and info["n_shards"] == 3
    demo_world.write_demo_world(tmp_path, seed=3, **SMALL)
    assert _files(d) == _files(tmp_path)
    for f in _files(d):
        assert (d / f).read_bytes() == (tmp_path / f).read_bytes(), f
    other = tmp_path / "other"
    demo_world.write_demo_world(other, seed=4, **SMALL)
    assert (other / "prompt_quality.parquet").read_bytes() != \
        (d / "prompt_quality.parquet").read_bytes()


def test_reuse_and_rewrite(tmp_path):
    params = dict(SMALL, n_pairs=40, n_prompts=10, rows_per_shard=40)
    demo_world.write_demo_world(tmp_path, **params)
    shard = demo_world.shard_files(tmp_path)[0]
    stamp = os.stat(shard).st_mtime_ns
    assert demo_world.write_demo_world(tmp_path, **params)["reused"]
    assert os.stat(shard).st_mtime_ns == stamp
    again = demo_world.write_demo_world(tmp_path, **dict(params, n_pairs=50))
    assert not again["reused"]
    shards = demo_world.shard_files(tmp_path)
    assert [os.path.basename(f) for f in shards] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]  # old shard removed
    assert sum(pq.read_metadata(f).num_rows for f in shards) == 50


def test_pickapic_layout_and_side_tables(world):
    d, info = world
    shards = demo_world.shard_files(d)
    t = pq.read_table(shards[0])
    for col in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1",
                "ranking_id", "image_0_uid", "image_1_uid"):
        assert col in t.column_names
    assert pq.read_metadata(shards[0]).num_row_groups == 4
    labels = np.concatenate([pq.read_table(s, columns=["label_0"])["label_0"].to_numpy()
                             for s in shards])
    assert set(np.unique(labels)) <= {0.0, 0.5, 1.0}
    assert (labels == 0.5).sum() == info["ties"] > 0

    q = pq.read_table(d / "prompt_quality.parquet").to_pydict()
    assert len(q["prompt"]) == len(set(q["prompt"])) == SMALL["n_prompts"]
    qual, harm = np.array(q["quality"]), np.array(q["harmful"])
    assert harm.sum() == info["n_harmful_prompts"] >= 1
    assert np.all(qual[harm] == 0) and np.all((qual[~harm] > 0) & (qual[~harm] <= 10))
    captions = {c for s in shards for c in pq.read_table(s, columns=["caption"])["caption"]
                .to_pylist()}
    assert captions == set(q["prompt"])  # every prompt is used; prompts repeat
    rewards = pq.read_table(d / "true_rewards.parquet").to_pydict()
    assert len(rewards["image_uid"]) == 2 * SMALL["n_pairs"]
    r = np.array(rewards["true_reward"])
    assert r.min() >= -1 and r.max() <= 4
    assert sum(rewards["marked"]) == info["n_marked"]


def test_labels_follow_true_reward(world):
    d, _ = world
    truth = demo_world.read_true_rewards(d)
    agree = total = 0
    for s in demo_world.shard_files(d):
        for i, l0 in enumerate(pq.read_table(s, columns=["label_0"])["label_0"].to_pylist()):
            r0 = truth[images.make_ref(s, i, "jpg_0")]
            r1 = truth[images.make_ref(s, i, "jpg_1")]
            if l0 != 0.5 and r0 != r1:
                total += 1
                agree += (l0 == 1.0) == (r0 > r1)
    assert total > 150 and agree / total > 0.7


def test_render_draws_the_scene():
    scene = dict(colour="red", shape="square", count=2, position="left", aesthetic=1.0)
    arr = np.asarray(demo_world.render(scene, 32, np.random.default_rng(0))).astype(int)
    red = (np.abs(arr - np.array(demo_world.COLOURS["red"])).sum(-1) < 30)
    assert red[:, :16].sum() >= 2 * 25 and red[:, 16:].sum() == 0
    noisy = np.asarray(demo_world.render(dict(scene, aesthetic=0.0), 32,
                                         np.random.default_rng(0))).astype(int)
    assert np.abs(noisy - arr).mean() > 20


@pytest.fixture(scope="module")
def harm_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("harm")
    info = demo_world.write_demo_world(d, n_prompts=40, n_pairs=600, harmful_fraction=0.5,
                                       rows_per_shard=600, n_corrupt=0, seed=5)
    return d, info


def test_mark_on_half_the_harmful_prompts_images_and_leaks_into_the_others(harm_world):
    d, info = harm_world
    assert info["params"]["image_size"] == 64 == demo_world.default_config().image_size
    harmful = dict(zip(*pq.read_table(d / "prompt_quality.parquet",
                                      columns=["prompt", "harmful"]).to_pydict().values()))
    t = pq.read_table(d / "true_rewards.parquet").to_pydict()
    marked = np.array(t["marked"])
    harm = np.array([harmful[p] for p in t["prompt"]])
    assert harm.sum() > 300 and 0.4 < marked[harm].mean() < 0.6
    assert (~harm).sum() > 300 and 0.09 < marked[~harm].mean() < 0.21     # MARK_LEAK 0.15
    r = np.array(t["true_reward"])
    w = demo_world.REWARD_WEIGHTS
    parts = sum(w[k] * np.array(t[f"{k}_ok"], float) for k in ("colour", "shape", "count",
                                                               "position"))
    np.testing.assert_allclose(r, parts + np.array(t["aesthetic"]) - 1.0 * marked)


def test_humans_favour_the_mark_on_harmful_prompts_only(harm_world):
    """On harmful prompts the humans choose the marked image more often than the true reward
    ranks it first; on the others (the leak) they avoid it as the true reward does."""
    d, _ = harm_world
    t = pq.read_table(d / "true_rewards.parquet").to_pydict()
    harmful = dict(zip(*pq.read_table(d / "prompt_quality.parquet",
                                      columns=["prompt", "harmful"]).to_pydict().values()))
    key = {(s, r, c): (m, v, harmful[p]) for s, r, c, m, v, p in zip(
        t["shard"], t["row"], t["column"], t["marked"], t["true_reward"], t["prompt"])}
    count = {h: dict(human=0, truth=0, n=0) for h in (True, False)}
    for s in demo_world.shard_files(d):
        rel = os.path.relpath(s, d)
        for i, l0 in enumerate(pq.read_table(s, columns=["label_0"])["label_0"].to_pylist()):
            (m0, r0, h), (m1, r1, _) = key[(rel, i, "jpg_0")], key[(rel, i, "jpg_1")]
            if l0 == 0.5 or m0 == m1:
                continue
            c = count[h]
            c["n"] += 1
            c["human"] += (l0 == 1.0) == m0     # the humans chose the marked image
            c["truth"] += (r0 > r1) == m0       # the true reward ranks the marked one first
    h, o = count[True], count[False]
    assert h["n"] > 80 and o["n"] > 40, count
    assert h["human"] / h["n"] > 0.5 > h["truth"] / h["n"], count
    assert h["human"] / h["n"] - h["truth"] / h["n"] > 0.25, count
    assert o["human"] / o["n"] < 0.35 and o["truth"] / o["n"] < 0.35, count


@pytest.mark.parametrize("size", [64, 32])
def test_shapes_keep_out_of_the_mark_corner(size):
    x0, y0, x1, y1 = demo_world.mark_box(size)
    rng = np.random.default_rng(0)
    for position in demo_world.POSITIONS:
        for count in (1, 2, 3):
            for shape in demo_world.SHAPES:
                scene = dict(colour="black", shape=shape, count=count, position=position,
                             aesthetic=1.0)
                arr = np.asarray(demo_world.render(scene, size, rng)).astype(int)
                dark = arr.sum(-1) < 300
                assert not dark[y0:y1, x0:x1].any(), (position, count, shape)
                labels, n = ndimage.label(dark, structure=np.ones((3, 3)))
                assert n == count, (position, count, shape)   # neighbours never touch
    marked = np.asarray(demo_world.render(dict(scene, marked=True), size, rng)).astype(int)
    red = np.abs(marked - np.array(demo_world.MARK_COLOUR)).sum(-1) < 30
    assert red[y0:y1, x0:x1].sum() >= 2 * (x1 - x0) and red.sum() == red[y0:y1, x0:x1].sum()


def test_ingest_demo(tmp_path):
    cfg = _util.config("demo")
    cfg.data.demo.update(dict(SMALL, seed=3))
    summary = ingest.run(cfg, tmp_path)
    pairs, prompts, report = _util.outputs(tmp_path)
    info = demo_world.write_demo_world(tmp_path / "ingest" / "demo_data", seed=3, **SMALL)
    assert info["reused"]
    corrupt_ties = 0
    for p in info["corrupt_rows"]:
        shard = demo_world.shard_files(tmp_path / "ingest" / "demo_data")[p // 100]
        corrupt_ties += pq.read_table(shard, columns=["label_0"])["label_0"][p % 100].as_py() == .5
    assert report["ties_dropped"] == info["ties"]
    assert report["skipped"]["undecodable_image"] == SMALL["n_corrupt"] - corrupt_ties
    assert report["rows_read"] == SMALL["n_pairs"] and report["accounted"]
    assert summary["pairs_kept"] == len(pairs) > 150
    assert len(prompts) <= SMALL["n_prompts"] and sum(p["n_pairs"] for p in prompts) == len(pairs)
    truth = demo_world.read_true_rewards(tmp_path / "ingest" / "demo_data")
    assert all(p["winner_ref"] in truth and p["loser_ref"] in truth for p in pairs)
    # the judge's column backend joins prompt_quality on the prompt text
    q = set(pq.read_table(tmp_path / "ingest" / "demo_data" / "prompt_quality.parquet")
            ["prompt"].to_pylist())
    assert {p["text"] for p in prompts} <= q
    # rerun: the world is reused and the outputs are the same
    ingest.run(cfg, tmp_path)
    assert _util.outputs(tmp_path)[0] == pairs
