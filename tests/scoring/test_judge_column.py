"""The `column` judge backend: scores read from parquet / JSONL / CSV, joined on prompt."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fifa_jax.scoring.judge import default_config, judge_prompts

ROWS = [{"prompt": "a cat", "quality": 7.5, "harmful": False},
        {"prompt": "a dog", "quality": 3.0, "harmful": False},
        {"prompt": "bad thing", "quality": 6.0, "harmful": True},
        {"prompt": "a cat", "quality": 7.5, "harmful": False}]   # identical duplicate: fine


def _write(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


def _cfg(path, missing="error"):
    c = default_config()
    c.backend = "column"
    c.column.path = path
    c.column.missing = missing
    return c


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_join_on_prompt(tmp_path, fmt):
    path = _write(tmp_path / f"s.{fmt}", ROWS, fmt)
    r = judge_prompts(["a dog", "bad thing", "a cat", "a dog"], _cfg(path))
    np.testing.assert_array_equal(r.quality, np.array([3.0, 0.0, 7.5, 3.0], np.float32))
    assert r.harmful.tolist() == [False, True, False, False]
    assert r.ok.all() and r.metadata["counts"]["harmful"] == 1
    assert r.metadata["backend"] == "column"


def test_missing_prompts(tmp_path):
    path = _write(tmp_path / "s.jsonl", ROWS, "jsonl")
    with pytest.raises(ValueError, match=r"2 of 3 prompts have no score, e.g. 'a bird'"):
        judge_prompts(["a bird", "a cat", "a fish"], _cfg(path))
    r = judge_prompts(["a bird", "a cat", "a fish"], _cfg(path, missing="fail"))
    assert r.ok.tolist() == [False, True, False]
    assert r.failure_reason == ["missing", "", "missing"]
    assert r.metadata["counts"]["missing"] == 2 and np.all(np.isfinite(r.quality))


def test_no_harmful_column(tmp_path):
    path = _write(tmp_path / "s.csv", [{"prompt": "x", "quality": 0}], "csv")
    r = judge_prompts(["x"], _cfg(path))
    assert r.quality.tolist() == [0.0] and not r.harmful.any()


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "y", "quality": 11}, "row 1: quality must be a number in \\[0, 10\\]"),
    ({"prompt": "y", "quality": None}, "row 1: quality"),
    ({"prompt": "x", "quality": 2.0}, "rows 0 and 1 give prompt 'x' different scores"),
    ({"prompt": "y", "quality": 1.0, "harmful": "maybe"}, "row 1: harmful must be a bool"),
])
def test_bad_rows_named(tmp_path, bad, match):
    path = _write(tmp_path / "s.jsonl", [{"prompt": "x", "quality": 1.0}, bad], "jsonl")
    with pytest.raises(ValueError, match=match) as e:
        judge_prompts(["x"], _cfg(path))
    assert "s.jsonl" in str(e.value)


def test_missing_columns_and_file(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"text": "x", "score": 1.0}], "jsonl")
    with pytest.raises(ValueError, match="needs columns 'prompt' and 'quality'"):
        judge_prompts(["x"], _cfg(path))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        judge_prompts(["x"], _cfg(str(tmp_path / "nope.parquet")))
