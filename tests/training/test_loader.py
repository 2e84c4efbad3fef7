"""PairLoader over the encode stage's output: determinism, epochs, host slices, resume,
flips, the validation pass; and the tfds writer's float16 round trip."""
import json

import numpy as np
import pytest

from fifa_jax.training import loader as loader_lib, pair_dataset
from fifa_jax.training.loader import PairLoader


def _loader(wd, **kw):
    args = dict(global_batch=4, seed=0, process_index=0, process_count=1, num_threads=2,
                prefetch=2)
    return PairLoader(wd / "encode", kw.pop("split", "train"), **{**args, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_shuffle_is_deterministic_by_seed_and_each_epoch_is_a_permutation(encoded):
    wd = encoded[0]
    a = _loader(wd)
    n = a.num_examples
    assert n == 23
    batches = _take(a, 12)                                   # 48 positions > 2 epochs
    ids = np.concatenate([b["pair_id"] for b in batches])
    again = np.concatenate([b["pair_id"] for b in _take(_loader(wd), 12)])
    other = np.concatenate([b["pair_id"] for b in _take(_loader(wd, seed=1), 12)])
    assert np.array_equal(ids, again) and not np.array_equal(ids, other)
    allids = sorted(r["pair_id"] for r in (pair_dataset.data_source(wd / "encode", "pairs",
                                                                    "train")[i]
                                           for i in range(n)))
    e0, e1 = ids[:n], ids[n:2 * n]
    assert sorted(e0) == allids and sorted(e1) == allids and not np.array_equal(e0, e1)
    assert not np.array_equal(e0, allids)                    # shuffled at all
    b = batches[0]
    assert b["moments_w"].shape == (4, 8, 8, 8) and b["prompt_embeds"].shape == (4, 12, 32)
    assert a.step == 12


def test_host_slices_partition_the_global_batch(encoded):
    wd = encoded[0]
    one = _take(_loader(wd, global_batch=6), 5)
    h0 = _take(_loader(wd, global_batch=6, process_index=0, process_count=2), 5)
    h1 = _take(_loader(wd, global_batch=6, process_index=1, process_count=2), 5)
    for full, x, y in zip(one, h0, h1):
        assert x["pair_id"].shape == (3,)
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([x[key], y[key]]))
    with pytest.raises(ValueError, match="multiple of the process count"):
        _loader(wd, global_batch=5, process_count=2)


def test_state_resumes_on_the_same_global_batch_with_another_host_count(encoded):
    wd = encoded[0]
    a = _loader(wd, global_batch=4, process_index=1, process_count=2)
    _take(a, 7)
    state = json.loads(json.dumps(a.get_state()))            # as a checkpoint stores it
    assert state["step"] == 7 and state["num_examples"] == 23
    ref = _loader(wd, global_batch=4)
    _take(ref, 7)
    want = next(ref)
    b = _loader(wd, global_batch=4)                         # one host now
    b.set_state(state)
    got = next(b)
    for key in want:
        np.testing.assert_array_equal(want[key], got[key])
    assert b.get_state()["step"] == 8
    a.set_state(state)                                       # and back on the old loader
    np.testing.assert_array_equal(next(a)["pair_id"], want["pair_id"][2:])
    for key, value in (("seed", 5), ("global_batch", 8), ("num_examples", 99)):
        with pytest.raises(ValueError, match=f"{key} was {value}"):
            b.set_state({**state, key: value})


def test_random_flips_pick_one_stored_posterior_per_image(encoded):
    wd = encoded[0]
    src = pair_dataset.data_source(wd / "encode", "pairs", "train")
    by_id = {src[i]["pair_id"]: src[i] for i in range(len(src))}
    flips = []
    for b in _take(_loader(wd), 6):
        assert "moments_w_flip" not in b
        for i, pid in enumerate(b["pair_id"]):
            for side in "wl":
                key = f"moments_{side}" + ("_flip" if b[f"flip_{side}"][i] else "")
                np.testing.assert_array_equal(b[f"moments_{side}"][i], by_id[pid][key])
        flips.append(np.stack([b["flip_w"], b["flip_l"]]))
    flips = np.concatenate(flips, axis=1)
    assert 0.2 < flips.mean() < 0.8 and not np.array_equal(flips[0], flips[1])
    none = next(_loader(wd, flip="none"))
    assert not {"moments_w_flip", "flip_w"} & set(none)
    for i, pid in enumerate(none["pair_id"]):
        np.testing.assert_array_equal(none["moments_w"][i], by_id[pid]["moments_w"])
    bits = loader_lib.flip_bits(0, np.arange(1000))
    assert np.array_equal(bits, loader_lib.flip_bits(0, np.arange(1000)))
    assert abs(bits.mean() - 0.5) < 0.05


def test_validation_pass_in_order_with_a_padded_last_batch(encoded):
    wd = encoded[0]
    for count in (1, 2):
        parts = [list(_loader(wd, split="validation", global_batch=4, process_index=p,
                              process_count=count).epoch_batches()) for p in range(count)]
        assert all(len(p) == 3 for p in parts)                      # ceil(10 / 4)
        ids = np.concatenate([np.concatenate([p[k]["pair_id"] for p in parts])
                              for k in range(3)])
        mask = np.concatenate([np.concatenate([p[k]["mask"] for p in parts])
                               for k in range(3)])
        src = pair_dataset.data_source(wd / "encode", "pairs", "validation")
        assert ids[mask].tolist() == [src[i]["pair_id"] for i in range(10)]
        assert mask.sum() == 10 and not mask[-2:].any()
        assert "flip_w" not in parts[0][0]
    empty = pair_dataset.load_empty_prompt(wd / "encode")
    assert _loader(wd).empty_prompt["prompt_embeds"].shape == empty["prompt_embeds"].shape


def test_tfds_writer_round_trips_float16_and_float32(tmp_path):
    rng = np.random.default_rng(0)
    data = {dt: [rng.normal(size=(2, 8, 4, 4)).astype(dt) for _ in range(3)]
            for dt in ("float16", "float32")}
    for dt, arrays in data.items():
        out = tmp_path / dt

        def pairs(arrays=arrays):
            for i, m in enumerate(arrays):
                yield {"pair_id": 10 + i, "prompt_row": i % 2, "moments_w": m[0],
                       "moments_l": m[1]}

        def prompts():
            for i in range(2):
                yield {"prompt_id": 7 + i, "prompt_embeds": np.full((5, 6), i, dt),
                       "pooled": np.arange(3, dtype=dt) + i}

        pair_dataset.write_datasets(
            out, pairs_spec={"moments_shape": (8, 4, 4), "dtype": dt, "flip": False},
            prompts_spec={"embeds_shape": (5, 6), "pooled_dim": 3, "dtype": dt},
            pair_splits={"train": pairs}, prompt_examples=prompts)
        src = pair_dataset.data_source(out, "pairs", "train")
        assert len(src) == 3
        for i, m in enumerate(arrays):
            rec = src[i]
            assert rec["pair_id"] == 10 + i and rec["moments_w"].dtype == np.dtype(dt)
            assert rec["moments_w"].tobytes() == m[0].tobytes()      # bit for bit
            assert rec["moments_l"].tobytes() == m[1].tobytes()
        p = pair_dataset.data_source(out, "prompts", "prompts")[1]
        assert p["prompt_id"] == 8 and p["pooled"].dtype == np.dtype(dt)
        assert np.array_equal(p["pooled"], np.arange(3) + 1)
        with pytest.raises(ValueError, match="no split 'validation'"):
            pair_dataset.data_source(out, "pairs", "validation")
