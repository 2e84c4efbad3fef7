"""The score stage on a small demo world: all outputs, failures flagged and counted, no NaN,
embeddings in prompt_id order, and a rerun that rescores nothing."""
import json

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fifa_jax import parallel
from fifa_jax.data import ingest
from fifa_jax.scoring import embeddings, stage

CORRUPT_PAIR = 5
DROPPED_PROMPT = 2


def _config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = parallel.default_config()
    c.data = ingest.default_config()
    c.data.format = "demo"
    c.data.demo.n_prompts = 12
    c.data.demo.n_pairs = 40
    c.data.demo.rows_per_shard = 40
    c.data.demo.row_group_rows = 20
    c.score = stage.default_config()
    c.score.reward.path = "demo"
    c.score.reward.dtype = "float32"
    c.score.reward.batch_size = 16
    c.score.reward.chunk_size = 16
    c.score.reward.num_workers = 2
    c.score.embedder.kind = "bert"
    c.score.embedder.batch_size = 8
    c.score.judge.backend = "column"
    c.score.judge.column.path = "ingest/demo_data/quality_for_test.parquet"  # workdir-relative
    c.score.judge.column.missing = "fail"
    return c


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("score_stage")
    config = _config()
    ingest.run(config, workdir)
    # One undecodable image and one prompt the judge file does not know.
    pairs_path = workdir / "ingest" / "pairs.parquet"
    pairs = pq.read_table(pairs_path)
    bad = workdir / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    losers = pairs.column("loser_ref").to_pylist()
    losers[CORRUPT_PAIR] = str(bad)
    pairs = pairs.set_column(pairs.column_names.index("loser_ref"), "loser_ref",
                             pa.array(losers, pa.string()))
    pq.write_table(pairs, pairs_path)
    texts = pq.read_table(workdir / "ingest" / "prompts.parquet").column("text").to_pylist()
    quality = pq.read_table(workdir / "ingest" / "demo_data" / "prompt_quality.parquet")
    keep = [p != texts[DROPPED_PROMPT] for p in quality.column("prompt").to_pylist()]
    pq.write_table(quality.filter(pa.array(keep)),
                   workdir / "ingest" / "demo_data" / "quality_for_test.parquet")
    summary = stage.run(config, workdir)
    return workdir, config, summary, texts, quality


def test_outputs_and_failure_counts(scored):
    workdir, _, summary, texts, _ = scored
    out = workdir / "score"
    m = pq.read_table(out / "margins.parquet")
    n_pairs = pq.read_metadata(workdir / "ingest" / "pairs.parquet").num_rows
    assert m.num_rows == n_pairs
    assert m.column("pair_id").to_pylist() == list(range(n_pairs))
    ok = m.column("ok").to_pylist()
    assert ok[CORRUPT_PAIR] is False and sum(ok) == n_pairs - 1
    np.testing.assert_allclose(m.column("margin_abs").to_numpy(),
                               np.abs(m.column("margin_signed").to_numpy()))
    for col in ("score_w", "score_l", "margin_signed", "margin_abs"):
        assert m.schema.field(col).type == pa.float32()
        assert np.all(np.isfinite(m.column(col).to_numpy()))
    report = json.loads((out / "score_report.json").read_text())
    assert report["failures"]["undecodable image (loser)"] == 1
    assert report["failures"]["judge missing"] == 1
    assert report["pairs_failed"] == 1 and report["prompts_ok"] == len(texts) - 1
    assert report["embedder"]["dim"] == 384 and report["margins"]["chunks_total"] >= 3
    assert set(report["truncated"]) == {"reward_prompt", "embedder_prompt", "judge_prompt"}
    assert summary["failures"] == report["failures"]


def test_prompt_scores(scored):
    workdir, _, _, texts, quality = scored
    ps = pq.read_table(workdir / "score" / "prompt_scores.parquet")
    assert ps.column("prompt_id").to_pylist() == list(range(len(texts)))
    q = ps.column("quality").to_numpy()
    assert ps.schema.field("quality").type == pa.float32()
    assert np.all(np.isfinite(q)) and q.min() >= 0 and q.max() <= 10
    ok = ps.column("ok").to_pylist()
    assert ok[DROPPED_PROMPT] is False
    assert ps.column("failure_reason").to_pylist()[DROPPED_PROMPT] == "judge missing"
    want = {r["prompt"]: r for r in quality.to_pylist()}
    for i, t in enumerate(texts):
        if i == DROPPED_PROMPT:
            continue
        assert q[i] == pytest.approx(want[t]["quality"], abs=1e-5)
        assert ps.column("harmful").to_pylist()[i] == bool(want[t]["harmful"])


def test_embeddings_by_prompt_id(scored):
    workdir, config, _, texts, _ = scored
    emb = np.load(workdir / "score" / "prompt_embeddings.npy")
    assert emb.shape == (len(texts), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    order = [3, 0, 7]
    again = embeddings.embed_prompts([texts[i] for i in order], config.score.embedder,
                                     parallel.make_mesh(config.mesh))
    np.testing.assert_allclose(again.embeddings, emb[order], atol=1e-5)


def test_rerun_rescores_nothing(scored):
    workdir, config, _, _, _ = scored
    out = workdir / "score"
    before = pq.read_table(out / "margins.parquet")
    stage.run(config, workdir)
    report = json.loads((out / "score_report.json").read_text())
    assert report["margins"]["chunks_scored"] == 0 and report["margins"]["images_scored"] == 0
    assert pq.read_table(out / "margins.parquet").equals(before)


def test_discarded_resume_state_rescores_everything(scored):
    """What `--force=score` calls: the next run rescores every chunk, to the same values."""
    workdir, config, _, _, _ = scored
    out = workdir / "score"
    before = pq.read_table(out / "margins.parquet")
    stage.discard_resume_state(workdir)
    stage.run(config, workdir)
    report = json.loads((out / "score_report.json").read_text())
    assert report["margins"]["chunks_reused"] == 0
    assert report["margins"]["chunks_scored"] == report["margins"]["chunks_total"]
    assert pq.read_table(out / "margins.parquet").equals(before)


def test_missing_ingest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairs.parquet"):
        stage.run(_config(), tmp_path)


def test_input_signature_follows_model_and_rating_files(tmp_path):
    """Replacing the ratings file or a checkpoint file in place changes the fingerprint input;
    files the ingest stage made (covered by its fingerprint) and the demo reward are left out."""
    import os
    config = _config()
    work = tmp_path / "w"
    work.mkdir()
    ratings = tmp_path / "ratings.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "quality": [5.0]}), ratings)
    config.score.judge.column.path = str(ratings)
    model = tmp_path / "reward"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config.score.reward.path = str(model)
    sig = stage.input_signature(config, work)
    assert set(sig) == {"reward", "judge_column"}
    pq.write_table(pa.table({"prompt": ["a", "b"], "quality": [5.0, 1.0]}), ratings)
    assert stage.input_signature(config, work)["judge_column"] != sig["judge_column"]
    (model / "config.json").write_text('{"projection_dim": 8}')
    os.utime(model / "config.json", ns=(1, 2))
    assert stage.input_signature(config, work)["reward"] != sig["reward"]
    config.score.reward.path = "demo"
    config.score.judge.column.path = "ingest/demo_data/quality.parquet"   # workdir-relative
    assert stage.input_signature(config, work) == {}     # before ingest made it: the same
    (work / "ingest" / "demo_data").mkdir(parents=True)
    (work / "ingest" / "demo_data" / "quality.parquet").write_bytes(b"x")
    assert stage.input_signature(config, work) == {}
    config.score.judge.column.path = "my_ratings.parquet"                  # the user's, in workdir
    (work / "my_ratings.parquet").write_bytes(b"y")
    assert set(stage.input_signature(config, work)) == {"judge_column"}


def test_default_embedder_is_the_reward_models_clip_text_tower():
    """method.md's default: prompts embedded by the CLIP text tower; empty path = the reward."""
    emb = stage.default_config().embedder
    assert emb.kind == "clip" and emb.path == ""
    assert stage.embedder_config(emb, "/models/PickScore_v1").path == "/models/PickScore_v1"
    emb.path = "/models/other_clip"
    assert stage.embedder_config(emb, "/models/PickScore_v1").path == "/models/other_clip"
    emb.kind, emb.path = "bert", ""
    assert stage.embedder_config(emb, "/models/PickScore_v1").path == ""
