"""The study's command (configs/demo_study.py) end to end on a small demo world: two methods x
two seeds of a few train steps; the held-out pairs stay out of every run; the results table,
curves and plot are written; a rerun skips the finished study."""
import json

import pyarrow.parquet as pq
import pytest

from tests.cli import run_main

# slow: its fixture runs the whole study command (2.2 min on 2 cores); the default suite keeps
# the study's results tests (test_study_results.py), .ci/run this one
pytestmark = pytest.mark.slow

SMALL = ["--config.data.demo.n_prompts=30", "--config.data.demo.n_pairs=200",
         "--config.data.demo.rows_per_shard=100", "--config.select.k_pairs=12",
         "--config.score.reward.batch_size=64", "--config.study.methods=importance,full",
         "--config.study.seeds=0,1", "--config.study.num_steps=2",
         "--config.study.curve_every=1", "--config.study.held_out_pairs=8",
         "--config.study.eval_prompts=4", "--config.study.sample_steps=2"]


def _cli(workdir):
    return run_main("demo_study.py", workdir, *SMALL)


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    return workdir, _cli(workdir)


def test_study_writes_table_curves_and_plot(study_run):
    workdir, out = study_run
    assert "ran ['ingest', 'score', 'study']" in out
    out_dir = workdir / "study"
    results = json.loads((out_dir / "results.json").read_text())
    assert sorted(results["methods"]) == ["full", "importance"]
    assert results["num_steps"] == 2 and results["seeds"] == ["0", "1"]
    kept = json.loads((out_dir / "pool" / "held_out.json").read_text())["kept_pairs"]
    assert results["methods"]["importance"]["pairs"] == 12
    assert results["methods"]["full"]["pairs"] == kept
    base = results["base"]
    assert base["heldout_implicit_acc"] == 0.5      # the base against itself: all ties
    for method in ("importance", "full"):
        row = results["methods"][method]
        assert row["true_reward"]["n"] == 2 and None not in row["true_reward"]["ci"]
        # intervals over the seeds and the 4 shared prompts (stats.crossed_mean_ci)
        assert row["true_reward"]["prompts"] == 4 and row["harm_rate"]["prompts"] == 4
        assert None not in row["true_reward_minus_base"]["ci"]
        assert row["reached_full_final"].endswith("/2")
        for seed in (0, 1):
            rec = json.loads((out_dir / "runs" / f"{method}_s{seed}" / "curve.json").read_text())
            assert [p["step"] for p in rec["curve"]] == [0, 1, 2]
            assert all(-1.0 <= p["true_reward"] <= 4.0 for p in rec["curve"])
            assert 0.0 <= rec["final"]["heldout_implicit_acc"] <= 1.0
            pp = rec["final"]["per_prompt"]
            assert len(pp["true_reward"]) == len(pp["marked"]) == len(pp["harmful"]) == 4
            assert abs(sum(pp["true_reward"]) / 4 - rec["final"]["true_reward"]) < 1e-6
            assert all("per_prompt" not in p for p in rec["curve"][:-1])
            assert rec["seconds_per_step"] > 0
    md = (out_dir / "results.md").read_text()
    assert "| importance | 12 |" in md and f"| full | {kept} |" in md
    png = (out_dir / "true_reward_vs_step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_held_out_pairs_are_in_no_run(study_run):
    workdir, _ = study_run
    held = set(json.loads((workdir / "study" / "pool" / "held_out.json").read_text())["pair_ids"])
    assert len(held) == 8
    for run in (workdir / "study" / "runs").iterdir():
        chosen = set(pq.read_table(run / "select" / "manifest.parquet")
                     .column("pair_id").to_pylist())
        assert chosen and not chosen & held, run.name


def test_rerun_skips_the_finished_study(study_run):
    workdir, _ = study_run
    before = (workdir / "study" / "results.json").read_bytes()
    out = _cli(workdir)
    assert "ran nothing, skipped ['ingest', 'score', 'study']" in out
    assert (workdir / "study" / "results.json").read_bytes() == before
