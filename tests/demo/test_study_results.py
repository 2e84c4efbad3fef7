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
