"""The stage runner: order, fingerprints, skip on rerun, rerun on change, refusals."""
import json
import sys
import types

import ml_collections
import pytest

from fifa_jax import pipeline
from fifa_jax.pipeline import PipelineError, Stage

CALLS = []


def _make_module(name):
    module = types.ModuleType(name)

    def run(config, workdir):
        CALLS.append(name)
        out = workdir / name.rsplit(".", 1)[-1]
        out.mkdir(parents=True, exist_ok=True)
        (out / "out.json").write_text(json.dumps({"value": config.get(name[-1], {}).get("v")}))
        return {"rows": 3}

    module.run = run
    return module


@pytest.fixture
def fake_stages(monkeypatch):
    stages = (Stage("a", "fakestage.a", ("seed", "a"), ()),
              Stage("b", "fakestage.b", ("seed", "b"), ("a",)),
              Stage("c", "fakestage.c", ("c",), ("b",)),
              Stage("d", None, ("d",), ("c",), "not written"))
    for s in stages[:3]:
        monkeypatch.setitem(sys.modules, s.module, _make_module(s.module))
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "STAGE_BY_NAME", {s.name: s for s in stages})
    CALLS.clear()
    return stages


def _config(stages="a,b,c"):
    return ml_collections.ConfigDict({"seed": 0, "stages": stages, "a": {"v": 1},
                                      "b": {"v": 2}, "c": {"v": 3}, "d": {}})


def test_runs_in_order_then_skips(fake_stages, tmp_path):
    msgs = []
    res = pipeline.run_pipeline(_config("c,a,b"), tmp_path, echo=msgs.append)
    assert CALLS == ["fakestage.a", "fakestage.b", "fakestage.c"]
    assert [r["status"] for r in res.values()] == ["ran"] * 3
    CALLS.clear()
    msgs.clear()
    res = pipeline.run_pipeline(_config(), tmp_path, echo=msgs.append)
    assert CALLS == []
    assert [r["status"] for r in res.values()] == ["skipped"] * 3
    assert all("skipped" in m for m in msgs)


def test_changed_section_reruns_stage_and_downstream(fake_stages, tmp_path):
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    CALLS.clear()
    cfg = _config()
    cfg.b.v = 20
    pipeline.run_pipeline(cfg, tmp_path, echo=lambda m: None)
    assert CALLS == ["fakestage.b", "fakestage.c"]


def test_single_stage_reads_upstream_fingerprint(fake_stages, tmp_path):
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    CALLS.clear()
    res = pipeline.run_pipeline(_config("c"), tmp_path, echo=lambda m: None)
    assert CALLS == [] and res["c"]["status"] == "skipped"
    res = pipeline.run_pipeline(_config("c"), tmp_path, force=["c"], echo=lambda m: None)
    assert CALLS == ["fakestage.c"]


def test_missing_upstream_is_an_error(fake_stages, tmp_path):
    with pytest.raises(PipelineError, match="needs the output of stage 'b'"):
        pipeline.run_pipeline(_config("c"), tmp_path)


def test_failed_stage_is_not_marked_done(fake_stages, tmp_path, monkeypatch):
    def boom(config, workdir):
        raise RuntimeError("disk full")
    monkeypatch.setattr(sys.modules["fakestage.b"], "run", boom)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    assert pipeline.read_done(tmp_path, "a") is not None
    assert pipeline.read_done(tmp_path, "b") is None


@pytest.mark.parametrize("spec,match", [("a,zzz", "unknown stage"), ("a,d", "not built yet"),
                                        ("", "empty")])
def test_bad_stage_lists(fake_stages, tmp_path, spec, match):
    with pytest.raises(PipelineError, match=match):
        pipeline.run_pipeline(_config(spec), tmp_path)


def test_real_registry_orders_stages_and_every_stage_is_built():
    assert pipeline.parse_stages("export,ingest,train") == ["ingest", "train", "export"]
    assert all(module for _, module in pipeline.PIPELINE)
    with pytest.raises(PipelineError, match="unknown stage"):
        pipeline.parse_stages("ingest,sample")


def test_stages_declare_themselves():
    """Each built stage's module declares its section, sections, upstream and speed-only keys;
    the runner reads them from there."""
    by_name = pipeline.STAGE_BY_NAME
    assert by_name["train"].upstream == ("encode",) and by_name["encode"].upstream == ("select",)
    assert by_name["export"].config_keys == ("export",)
    assert "train.log_every" in by_name["train"].speed_only
    assert "data.num_workers" in by_name["ingest"].speed_only
    assert not by_name["ingest"].all_hosts and by_name["train"].all_hosts


def test_bad_input_becomes_one_line_pipeline_error(fake_stages, tmp_path, monkeypatch):
    from fifa_jax.errors import InputError

    def bad(config, workdir):
        raise InputError("shard_003.parquet: missing column 'jpg_1'")
    monkeypatch.setattr(sys.modules["fakestage.a"], "run", bad)
    with pytest.raises(PipelineError, match="stage 'a' failed on its input: shard_003.parquet"):
        pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)


def test_forced_upstream_reruns_downstream(fake_stages, tmp_path):
    """A rerun upstream stage (same config, e.g. new data on disk) invalidates its readers."""
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    CALLS.clear()
    pipeline.run_pipeline(_config(), tmp_path, force=["a"], echo=lambda m: None)
    assert CALLS == ["fakestage.a", "fakestage.b", "fakestage.c"]
    # forced alone, in its own call: the next call reruns the readers, then skips again
    CALLS.clear()
    pipeline.run_pipeline(_config("a"), tmp_path, force=["a"], echo=lambda m: None)
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    assert CALLS == ["fakestage.a", "fakestage.b", "fakestage.c"]
    CALLS.clear()
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    assert CALLS == []


def test_stale_upstream_left_out_of_stages_is_refused(fake_stages, tmp_path):
    """stages=c must not read b's outputs when b was made from an older a."""
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    changed = _config("a")
    changed.a.v = 10
    pipeline.run_pipeline(changed, tmp_path, echo=lambda m: None)
    later = _config("c")
    later.a.v = 10
    with pytest.raises(PipelineError, match="stage 'b' .* is out of date.*'a'"):
        pipeline.run_pipeline(later, tmp_path, echo=lambda m: None)
    # a rerun in the same call with b left out: b is stale too, and nothing runs (the whole
    # plan is checked before the first stage starts)
    CALLS.clear()
    with pytest.raises(PipelineError, match="stage 'b' .* is out of date"):
        pipeline.run_pipeline(_config("a,c"), tmp_path, force=["a"], echo=lambda m: None)
    assert CALLS == []
    fixed = _config("b,c")
    fixed.a.v = 10
    pipeline.run_pipeline(fixed, tmp_path, echo=lambda m: None)
    assert CALLS == ["fakestage.b", "fakestage.c"]


def test_global_seed_does_not_rerun_ingest_or_score():
    """Neither ingest nor score uses config.seed: a new seed must not redo them (hours)."""
    one = ml_collections.ConfigDict({"seed": 0, "data": {"path": "x"}, "score": {"b": 1}})
    two = ml_collections.ConfigDict({"seed": 1, "data": {"path": "x"}, "score": {"b": 1}})
    ingest, score = pipeline.STAGE_BY_NAME["ingest"], pipeline.STAGE_BY_NAME["score"]
    assert pipeline.fingerprint(one, ingest, {}) == pipeline.fingerprint(two, ingest, {})
    assert (pipeline.fingerprint(one, score, {"ingest": "f"})
            == pipeline.fingerprint(two, score, {"ingest": "f"}))
    select = pipeline.STAGE_BY_NAME["select"]
    up = {"ingest": "f", "score": "g"}
    assert pipeline.fingerprint(one, select, up) != pipeline.fingerprint(two, select, up)


def test_force_of_a_stage_not_run_is_an_error(fake_stages, tmp_path):
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    CALLS.clear()
    with pytest.raises(PipelineError, match=r"--force names stage\(s\) \['a'\].*config.stages = c"):
        pipeline.run_pipeline(_config("c"), tmp_path, force=["a"], echo=lambda m: None)
    assert CALLS == []


def test_changed_data_files_rerun_ingest(tmp_path):
    """The ingest fingerprint covers its data files: a new shard in the folder, or a rewritten
    one, reruns ingest although the config is unchanged; untouched files skip it."""
    from tests.data import _util
    shards = tmp_path / "shards"
    shards.mkdir()
    row = {"caption": "a red square", "jpg_0": _util.jpeg((200, 30, 30)),
           "jpg_1": _util.jpeg((30, 200, 30)), "label_0": 1.0, "label_1": 0.0,
           "model_0": "m0", "model_1": "m1", "ranking_id": 0}
    _util.write_shard(shards / "train-0.parquet", [row])
    cfg = _util.config("pickapic", shards)
    cfg.stages = "ingest"
    work = tmp_path / "w"

    def status():
        return pipeline.run_pipeline(cfg, work, echo=lambda m: None)["ingest"]["status"]

    assert status() == "ran"
    assert status() == "skipped"
    _util.write_shard(shards / "train-1.parquet", [dict(row, caption="a blue square")])
    assert status() == "ran"
    assert _util.outputs(work)[2]["pairs_kept"] == 2
    assert status() == "skipped"
    _util.write_shard(shards / "train-1.parquet", [dict(row, caption="a green circle!")])
    assert status() == "ran"


def test_force_discards_resumable_state(fake_stages, tmp_path):
    """--force on a finished stage calls its module's discard_resume_state (compute again);
    a first run, or a rerun for a changed config, resumes instead."""
    discarded = []
    sys.modules["fakestage.a"].discard_resume_state = lambda w: discarded.append(w)
    pipeline.run_pipeline(_config("a"), tmp_path, echo=lambda m: None)
    cfg = _config("a")
    cfg.a.v = 5
    pipeline.run_pipeline(cfg, tmp_path, echo=lambda m: None)
    assert discarded == []
    pipeline.run_pipeline(cfg, tmp_path, force=["a"], echo=lambda m: None)
    assert discarded == [tmp_path]


def test_unlisted_stage_with_other_settings_is_refused(fake_stages, tmp_path):
    """A stage read but not run must have run with this config's settings."""
    pipeline.run_pipeline(_config(), tmp_path, echo=lambda m: None)
    cfg = _config("c")
    cfg.b.v = 20                                   # b's outputs were made with v = 2
    with pytest.raises(PipelineError, match=r"stage 'b' .* section\(s\) \['b'\]"):
        pipeline.run_pipeline(cfg, tmp_path, echo=lambda m: None)


def test_speed_settings_are_not_in_fingerprints():
    stage = pipeline.STAGE_BY_NAME["score"]
    one = ml_collections.ConfigDict({"score": {"reward": {"num_workers": 4, "chunk_size": 64,
                                                          "dtype": "float32"}}})
    two = ml_collections.ConfigDict({"score": {"reward": {"num_workers": 16, "chunk_size": 8,
                                                          "dtype": "float32"}}})
    three = ml_collections.ConfigDict({"score": {"reward": {"num_workers": 4, "chunk_size": 64,
                                                            "dtype": "bfloat16"}}})
    fps = {"ingest": "x"}
    assert pipeline.fingerprint(one, stage, fps) == pipeline.fingerprint(two, stage, fps)
    assert pipeline.fingerprint(one, stage, fps) != pipeline.fingerprint(three, stage, fps)


def test_retryable_failures_run_the_stage_again(fake_stages, tmp_path, monkeypatch):
    """A run that reports retryable failures is not final: the next call runs it again; once
    a run has none, calls skip it."""
    left = [2, 0]
    module = sys.modules["fakestage.a"]
    plain = module.run
    monkeypatch.setattr(module, "run",
                        lambda c, w: dict(plain(c, w), retryable_failures=left.pop(0)))
    msgs = []
    pipeline.run_pipeline(_config("a"), tmp_path, echo=msgs.append)
    res = pipeline.run_pipeline(_config("a"), tmp_path, echo=msgs.append)
    assert res["a"]["status"] == "ran"
    assert any("2 retryable failure(s)" in m for m in msgs)
    res = pipeline.run_pipeline(_config("a"), tmp_path, echo=msgs.append)
    assert res["a"]["status"] == "skipped" and CALLS == ["fakestage.a"] * 2


def test_force_after_a_killed_run_discards_its_partial_results(fake_stages, tmp_path):
    """A killed run leaves partial results but no done file: --force must still discard them."""
    discarded = []
    sys.modules["fakestage.a"].discard_resume_state = lambda w: discarded.append(w)
    pipeline.run_pipeline(_config("a"), tmp_path, echo=lambda m: None)
    (tmp_path / "a" / pipeline.DONE_FILE).unlink()          # as after a kill
    pipeline.run_pipeline(_config("a"), tmp_path, force=["a"], echo=lambda m: None)
    assert discarded == [tmp_path]


def test_compile_cache_auto_prefers_the_environment(tmp_path, monkeypatch):
    """`compile_cache="auto"`: $JAX_COMPILATION_CACHE_DIR when set (one cache for every work
    directory), else WORKDIR/jax_cache; a path is taken as given; "" leaves JAX alone."""
    import jax
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "shared"))
        auto = ml_collections.ConfigDict({"compile_cache": "auto"})
        assert pipeline._compile_cache(auto, tmp_path / "w") == str(tmp_path / "shared")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert pipeline._compile_cache(auto, tmp_path / "w") == str(tmp_path / "w" / "jax_cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "w" / "jax_cache")
        given = ml_collections.ConfigDict({"compile_cache": str(tmp_path / "c")})
        assert pipeline._compile_cache(given, tmp_path / "w") == str(tmp_path / "c")
        assert pipeline._compile_cache(ml_collections.ConfigDict({"compile_cache": ""}),
                                       tmp_path / "w") is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
