"""select.margin_mode (top | bottom | band:LO-HI) and select.relabel against direct, slow
computations on the random work directory of test_stage; the relabelled winners reach the
encode stage's image refs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fifa_jax.config_check import ConfigError
from fifa_jax.selection import options, stage
from tests.selection.test_stage import JUDGE_FAILED_PROMPT, config, make_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("wd_options"), seed=5)


def _table(path, sort=None):
    t = pq.read_table(path)
    if sort:
        t = t.sort_by(sort)
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def _inputs(wd):
    """Candidate pairs (ok, judge fine) in pair_id order: ids, signed margins."""
    m = _table(wd / "score" / "margins.parquet", "pair_id")
    p = _table(wd / "ingest" / "pairs.parquet", "pair_id")
    keep = m["ok"] & (p["prompt_id"] != JUDGE_FAILED_PROMPT)
    return m["pair_id"][keep], m["margin_signed"].astype(np.float64)[keep]


def _run(wd, **kw):
    stage.run(config("margin", k_pairs=kw.pop("k", 15), **kw), wd)
    man = _table(wd / "select" / "manifest.parquet")
    rep = json.loads((wd / "select" / "report.json").read_text())
    return man, rep["counts"]


def _slow_top(ids, values, k):
    """Sort by (value desc, pair_id asc), one comparison at a time."""
    order = sorted(range(len(ids)), key=lambda i: (-values[i], ids[i]))
    return [int(ids[i]) for i in order[:k]]


def test_parse_margin_mode():
    assert options.parse_margin_mode("top") == ("top", None)
    assert options.parse_margin_mode("bottom") == ("bottom", None)
    assert options.parse_margin_mode("band:0.4-0.6") == ("band", (0.4, 0.6))
    assert options.parse_margin_mode("band:0-1") == ("band", (0.0, 1.0))
    for bad in ("middle", "band:0.6-0.4", "band:0.2-1.5", "band:0.2", "band:a-b", "Top"):
        with pytest.raises(ConfigError, match="select.margin_mode") as e:
            options.parse_margin_mode(bad)
        assert "\n" not in str(e.value)
    c = config("margin", margin_mode="band:0.9-0.1")
    with pytest.raises(ConfigError, match="select.margin_mode"):
        stage.check_config(c.select)


def test_top_is_unchanged_and_bottom_takes_the_smallest(workdir):
    ids, ms = _inputs(workdir)
    man, _ = _run(workdir)
    assert man["pair_id"].tolist() == _slow_top(ids, np.abs(ms), 15)
    assert not man["relabeled"].any()
    np.testing.assert_array_equal(man["proxy_margin"], man["margin_signed"])
    man, _ = _run(workdir, margin_mode="bottom")
    assert man["pair_id"].tolist() == _slow_top(ids, -np.abs(ms), 15)


@pytest.mark.parametrize("band", [(0.4, 0.6), (0.0, 0.9)])
def test_band_keeps_the_quantile_band(workdir, band):
    ids, ms = _inputs(workdir)
    a = np.abs(ms)
    srt = np.sort(a)

    def quantile(q):                  # numpy's linear rule, written out
        pos = q * (a.size - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, a.size - 1)
        return srt[lo] + (pos - lo) * (srt[hi] - srt[lo])

    inside = [i for i in range(a.size) if quantile(band[0]) <= a[i] <= quantile(band[1])]
    man, counts = _run(workdir, margin_mode=f"band:{band[0]}-{band[1]}", k=10)
    assert counts["excluded_margin_band"] == a.size - len(inside)
    assert counts["candidates"] == len(inside)
    assert man["pair_id"].tolist() == _slow_top(ids[inside], a[inside], 10)


def test_relabel_flips_disagreeing_pairs_and_counts_them(workdir):
    ids, ms = _inputs(workdir)
    man, counts = _run(workdir, relabel=True, margin="signed", k=20)
    # signed margins after relabelling are |margin_signed|
    assert man["pair_id"].tolist() == _slow_top(ids, np.abs(ms), 20)
    flipped = {int(i) for i, m in zip(ids, ms) if m < 0}
    assert counts["relabeled_candidates"] == len(flipped)
    assert man["relabeled"].tolist() == [int(p) in flipped for p in man["pair_id"]]
    assert counts["relabeled_selected"] == int(man["relabeled"].sum()) > 0
    np.testing.assert_allclose(man["proxy_margin"], np.abs(man["margin_signed"]))
    # without relabel the signed ranking is another one
    man2, counts2 = _run(workdir, margin="signed", k=20)
    assert man2["pair_id"].tolist() == _slow_top(ids, ms, 20)
    assert counts2["relabeled_candidates"] == 0 and not man2["relabeled"].any()


def test_relabel_reaches_the_encode_stage_refs(tmp_path):
    """encode.read_inputs swaps winner and loser refs of the manifest's relabelled pairs only
    (validation pairs, not in the manifest, keep the human label)."""
    from fifa_jax.training import encode
    (tmp_path / "ingest").mkdir()
    (tmp_path / "select").mkdir()
    n = 6
    pq.write_table(pa.table({"pair_id": np.arange(n, dtype=np.int64)[::-1].copy(),
                             "prompt_id": np.zeros(n, np.int64),
                             "winner_ref": [f"w{i}" for i in range(n)][::-1],
                             "loser_ref": [f"l{i}" for i in range(n)][::-1]}),
                   tmp_path / "ingest" / "pairs.parquet")
    pq.write_table(pa.table({"prompt_id": np.zeros(1, np.int64), "text": ["a"]}),
                   tmp_path / "ingest" / "prompts.parquet")
    pq.write_table(pa.table({"rank": np.arange(3, dtype=np.int64),
                             "pair_id": np.array([4, 1, 2], np.int64),
                             "prompt_id": np.zeros(3, np.int64),
                             "relabeled": np.array([True, False, True])}),
                   tmp_path / "select" / "manifest.parquet")
    got = encode.read_inputs(tmp_path)
    assert got["relabeled"] == 2
    refs = dict(zip(got["pair_id"].tolist(), zip(got["winner_ref"], got["loser_ref"])))
    assert refs == {0: ("w0", "l0"), 1: ("w1", "l1"), 2: ("l2", "w2"), 3: ("w3", "l3"),
                    4: ("l4", "w4"), 5: ("w5", "l5")}
