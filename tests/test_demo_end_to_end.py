"""The README's first command on a small demo world: every built stage runs, a rerun skips them."""
import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.data.demo.n_prompts=40", "--config.data.demo.n_pairs=300",
         "--config.data.demo.rows_per_shard=150", "--config.select.k_pairs=30",
         "--config.score.reward.batch_size=64", "--config.score.reward.chunk_size=128"]


def _cli(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="")  # the demo runs on one CPU device, as a user would
    proc = subprocess.run(
        [sys.executable, "-m", "fifa_jax.main", "--config", str(ROOT / "configs" / "demo.py"),
         "--workdir", str(workdir), *SMALL, *extra],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, _cli(workdir)


def test_demo_runs_every_built_stage(demo_run):
    workdir, out = demo_run
    assert "ran ['ingest', 'score', 'select']" in out
    report = json.loads((workdir / "ingest" / "ingest_report.json").read_text())
    assert report["rows_read"] == 300
    manifest = pq.read_table(workdir / "select" / "manifest.parquet")
    assert manifest.num_rows == 30
    assert sorted((workdir / "select").glob("*.png"))
    for stage in ("ingest", "score", "select"):
        assert (workdir / stage / "STAGE_DONE.json").exists()


def test_rerun_skips_finished_stages(demo_run):
    workdir, _ = demo_run
    before = (workdir / "select" / "manifest.parquet").read_bytes()
    out = _cli(workdir)
    assert "ran nothing, skipped ['ingest', 'score', 'select']" in out
    assert out.count("skipped: finished at") == 3
    assert (workdir / "select" / "manifest.parquet").read_bytes() == before


def test_changed_selection_reruns_only_select(demo_run):
    workdir, _ = demo_run
    out = _cli(workdir, "--config.stages=select", "--config.select.method=random")
    assert "ran ['select']" in out
    manifest = pq.read_table(workdir / "select" / "manifest.parquet")
    assert set(manifest.column("method").to_pylist()) == {"random"}
