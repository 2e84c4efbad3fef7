"""The demo study's results: Student-t intervals over seeds, time to reach the full-data
run's final true reward, the table and the plot (from synthetic curves)."""
import math

import numpy as np

from fifa_jax.demo import study


def test_mean_ci_is_the_student_t_interval():
    got = study.mean_ci([1.0, 2.0, 4.0])
    v = np.array([1.0, 2.0, 4.0])
    half = 4.303 * v.std(ddof=1) / math.sqrt(3)
    assert math.isclose(got["mean"], v.mean())
    assert np.allclose(got["ci"], [v.mean() - half, v.mean() + half])
    assert study.mean_ci([None, 3.0]) == {"mean": 3.0, "ci": [None, None], "n": 1}
    assert study.mean_ci([None])["mean"] is None


def _run(method, seed, finals, sec_per_step=0.5):
    curve = [{"step": 25 * i, "true_reward": r, "harm_rate": 0.5 - 0.1 * i}
             for i, r in enumerate(finals)]
    curve[-1]["heldout_implicit_acc"] = 0.6
    return {"method": method, "seed": seed, "pairs": 10, "train_seconds": 75.0,
            "seconds_per_step": sec_per_step, "curve": curve, "final": curve[-1]}


def test_time_to_reach_and_table(tmp_path):
    runs = {f"full_s{s}": _run("full", s, [1.0, 1.5, 2.0 + 0.1 * s]) for s in range(3)}
    runs.update({f"importance_s{s}": _run("importance", s, [1.0, 2.2, 2.3]) for s in range(3)})
    runs.update({f"random_s{s}": _run("random", s, [1.0, 1.1, 1.2]) for s in range(3)})
    assert study.time_to_reach(runs["importance_s0"], 2.1) == 25 * 0.5
    assert study.time_to_reach(runs["random_s0"], 2.1) is None
    st = study.default_config()
    st.methods = "importance,random,full"
    res = study.summarize(runs, {"true_reward": 1.0, "harm_rate": 0.5}, ["importance", "random",
                                                                        "full"], st)
    assert math.isclose(res["full_final_true_reward"], 2.1)
    imp, rnd = res["methods"]["importance"], res["methods"]["random"]
    assert imp["reached_full_final"] == "3/3" and rnd["reached_full_final"] == "0/3"
    assert math.isclose(imp["seconds_to_full_final"]["mean"], 12.5)
    assert math.isclose(imp["true_reward"]["mean"], 2.3)
    # FiFA - random, paired by seed: finals 2.3 - 1.2 on every seed; harm equal
    d = res["differences"]
    assert set(d) == {"importance - random", "importance - full"}
    assert math.isclose(d["importance - random"]["true_reward"]["mean"], 1.1)
    assert d["importance - random"]["true_reward"]["n"] == 3
    full_diffs = np.array([2.3 - (2.0 + 0.1 * s) for s in range(3)])
    half = 4.303 * full_diffs.std(ddof=1) / math.sqrt(3)
    assert np.allclose(d["importance - full"]["true_reward"]["ci"],
                       [full_diffs.mean() - half, full_diffs.mean() + half])
    assert d["importance - full"]["harm_rate"]["mean"] == 0.0
    text = study.markdown(res, st)
    assert "| importance - random | +1.100" in text
    assert "| importance | 10 | 2.300" in text and "true_reward_vs_step.png" in text
    study.plot_curves(runs, ["importance", "random", "full"], tmp_path / "curve.png")
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "curve.png").convert("L"), np.float64)
    assert img.std() > 10


def test_intervals_cover_seeds_and_the_shared_prompts():
    """With per-prompt finals, the table, the differences and '- base' take
    stats.crossed_mean_ci of the (seeds, prompts) values; paired by seed and prompt."""
    from fifa_jax.evaluation import stats
    rng = np.random.default_rng(3)
    prompt_effect = rng.normal(0, 1.0, 16)
    harmful = (np.arange(16) < 4).astype(int)

    def final(shift, seed):
        r = 2.0 + shift + prompt_effect + rng.normal(0, 0.2, 16)
        marked = (rng.random(16) < 0.3).astype(int)
        return {"step": 50, "true_reward": float(r.mean()), "harm_rate": float(marked.mean()),
                "harm_rate_harmful": float(marked[:4].mean()),
                "per_prompt": {"true_reward": r.tolist(), "marked": marked.tolist(),
                               "harmful": harmful.tolist()}}

    runs = {}
    for m, shift in (("importance", 0.1), ("random", 0.0)):
        for s in range(4):
            f = final(shift, s)
            runs[f"{m}_s{s}"] = {"method": m, "seed": s, "pairs": 10, "train_seconds": 1.0,
                                 "seconds_per_step": 0.1, "curve": [f], "final": f}
    base = final(-0.2, 0)
    st = study.default_config()
    res = study.summarize(runs, base, ["importance", "random"], st)

    def rows(m, key):
        return np.stack([np.asarray(runs[f"{m}_s{s}"]["final"]["per_prompt"][key], float)
                         for s in range(4)])

    imp = res["methods"]["importance"]
    want = stats.crossed_mean_ci(rows("importance", "true_reward"))
    assert np.allclose(imp["true_reward"]["ci"], want["ci"])
    # wider than the Student-t over the seeds' means: the shared prompts' spread is in it
    seeds_only = study.mean_ci([r["final"]["true_reward"] for r in runs.values()
                                if r["method"] == "importance"])
    assert (want["ci"][1] - want["ci"][0]) > 2 * (seeds_only["ci"][1] - seeds_only["ci"][0])
    base_rows = np.asarray(base["per_prompt"]["true_reward"])[None, :]
    assert np.allclose(imp["true_reward_minus_base"]["ci"],
                       stats.crossed_mean_ci(rows("importance", "true_reward")
                                             - base_rows)["ci"])
    d = res["differences"]["importance - random"]
    assert np.allclose(d["true_reward"]["ci"],
                       stats.crossed_mean_ci(rows("importance", "true_reward")
                                             - rows("random", "true_reward"))["ci"])
    assert np.allclose(d["harm_rate_harmful"]["ci"],
                       stats.crossed_mean_ci(rows("importance", "marked")[:, :4]
                                             - rows("random", "marked")[:, :4])["ci"])
    assert d["true_reward"]["prompts"] == 16 and d["true_reward"]["n"] == 4
    text = study.markdown(res, st)
    assert "over the seeds and the 64 prompts" in text and "| - base |" in text


def test_rate_intervals_stay_within_0_and_1():
    f = {"step": 1, "true_reward": 1.0, "harm_rate": 0.0625, "harm_rate_harmful": 0.0,
         "per_prompt": {"true_reward": [1.0] * 16, "marked": [1] + [0] * 15,
                        "harmful": [1, 1] + [0] * 14}}
    g = {**f, "per_prompt": {**f["per_prompt"], "marked": [0] * 16}}
    runs = {f"random_s{s}": {"method": "random", "seed": s, "pairs": 1, "train_seconds": 1.0,
                             "seconds_per_step": 0.1, "curve": [x], "final": x}
            for s, x in enumerate([f, g, g])}
    row = study.summarize(runs, f, ["random"], study.default_config())["methods"]["random"]
    assert row["harm_rate"]["ci"][0] == 0.0 < row["harm_rate"]["ci"][1] < 1.0
