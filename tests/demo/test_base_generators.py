"""The demo world's on-policy generators (data.demo.generators="base"): the oracle's reading
of a generated image makes the same scene the scripted world records, the settings are
checked, and (slow) a world sampled from the shipped base is deterministic, pairs two
different images of one prompt and records what the oracle reads."""
import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fifa_jax.demo import assets, base_generators, world as dw


def _prompt(harmful=False):
    rng = np.random.default_rng(5)
    while True:
        p = dw.make_prompts(1, rng, harmful_fraction=1.0 if harmful else 0.0)[0]
        if p["colour"] and p["shape"]:
            return p


@pytest.mark.parametrize("harmful", [False, True])
def test_scene_of_reads_what_the_world_drew(harmful):
    prompt = _prompt(harmful)
    rng = np.random.default_rng(11)
    for k in range(12):
        im, scene = dw.make_image(prompt, "demo-gen-base", 64, rng)
        name = list(base_generators.VARIANTS)[1]
        got = base_generators.scene_of(prompt, np.asarray(im), name)
        assert got["model"] == name
        for key in ("colour_ok", "shape_ok", "count_ok", "position_ok", "marked"):
            assert got[key] == scene[key], (k, key)
        assert abs(got["aesthetic"] - scene["aesthetic"]) < 0.1
        # the reward is the world's formula on what the oracle read
        want = dw.reward_of(got["colour_ok"], got["shape_ok"], got["count_ok"],
                            got["position_ok"], got["aesthetic"], got["marked"])
        assert got["true_reward"] == pytest.approx(want)
        pull = dw.MARK_HUMAN_PULL * (got["marked"] and harmful)
        assert got["human_reward"] == pytest.approx(want + pull)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="generators must be 'scenes' or 'base'"):
        dw.write_demo_world(tmp_path / "a", generators="diffusion")
    with pytest.raises(ValueError, match="needs the demo base pipeline's folder and a sampler"):
        dw.write_demo_world(tmp_path / "b", generators="base", base_folder=str(tmp_path))
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        base_generators.sample_pools([_prompt()], str(tmp_path), 1, 0)


def test_scripted_world_keeps_its_parameters():
    """generators="scenes" (the default) records exactly the parameters it always did, so
    the scripted world's files, and every figure made on them, are unchanged."""
    cfg = dw.default_config().to_dict()
    assert cfg["generators"] == "scenes"
    keys = set(dw._params(**{k: v for k, v in cfg.items()
                             if k not in ("generators", "samples_per_prompt")}))
    assert keys == set(dw._params(**cfg))
    assert "generators" not in keys and "base_unet" not in keys


@pytest.mark.slow
def test_base_world_is_on_policy_and_deterministic(tmp_path):
    base = assets.resolve_base_model(assets.DEMO, tmp_path / "work")
    params = dict(n_prompts=3, n_pairs=8, rows_per_shard=8, row_group_rows=4, n_corrupt=1,
                  generators="base", samples_per_prompt=3, base_folder=base, seed=2,
                  sample_pools=base_generators.sample_pools)
    info = dw.write_demo_world(tmp_path / "w1", **params)
    assert not info["reused"] and info["params"]["base_unet"]
    assert dw.write_demo_world(tmp_path / "w1", **params)["reused"]
    dw.write_demo_world(tmp_path / "w2", **params)
    for f in info["files"]:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f

    shard = pq.read_table(dw.shard_files(tmp_path / "w1")[0]).to_pylist()
    rewards = pq.read_table(tmp_path / "w1" / "true_rewards.parquet").to_pylist()
    by_key = {(r["row"], r["column"]): r for r in rewards}
    prompts = dw.make_prompts(3, np.random.default_rng(2), 0.05)    # the world's own draw
    pools = base_generators.sample_pools(prompts, base, 3, 2)
    pool_of = {p["text"]: pool for p, pool in zip(prompts, pools)}
    uid_pick = {}
    for i, row in enumerate(shard):
        assert row["image_0_uid"] != row["image_1_uid"], i    # two different pool images
        for side in (0, 1):
            rec = by_key[(i, f"jpg_{side}")]
            assert rec["model"] in base_generators.VARIANTS and rec["prompt"] == row["caption"]
            if i in info["corrupt_rows"] and side == 1:
                continue
            img = np.asarray(Image.open(io.BytesIO(row[f"jpg_{side}"])).convert("RGB"), int)
            # the stored JPEG is one of its prompt's pool images, and the recorded scene
            # is the oracle's reading of that image
            errs = [np.abs(img - np.asarray(im, int)).mean() for im, _ in pool_of[row["caption"]]]
            k = int(np.argmin(errs))
            assert errs[k] < 4.0, (i, side, errs)
            scene = pool_of[row["caption"]][k][1]
            assert rec["true_reward"] == pytest.approx(scene["true_reward"])
            assert rec["model"] == scene["model"] == list(base_generators.VARIANTS)[k % 3]
            assert uid_pick.setdefault(row[f"image_{side}_uid"], k) == k   # one uid an image
    assert os.path.exists(os.path.join(base, "unet"))


def test_ingest_hands_the_world_the_base_and_its_sampler(tmp_path):
    from fifa_jax.data import ingest
    demo = dw.default_config()
    assert ingest._world_params(demo, tmp_path / "ingest") == demo.to_dict()
    demo.generators = "base"
    params = ingest._world_params(demo, tmp_path / "ingest")
    assert params["sample_pools"] is base_generators.sample_pools
    assert params["base_folder"] == os.path.join(str(tmp_path), *assets.DEMO_BASE_DIR)
    assert os.path.exists(os.path.join(params["base_folder"], "model_index.json"))
