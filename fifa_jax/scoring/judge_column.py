"""The `column` judge backend: quality scores already present in a file.

The file (`.parquet`, `.jsonl`/`.json` one object per line, or `.csv`) has columns `prompt`
(str) and `quality` (number in [0, 10]), optionally `harmful` (bool, or 0/1, "true"/"false").
Rows join on the exact prompt text. Without a `harmful` column no prompt is flagged harmful.
A row with an invalid quality, or the same prompt twice with different values, is an error
naming the file and row. A prompt absent from the file is, by `column.missing`:
`"error"` (default) -> ValueError with how many are missing and an example;
`"fail"` -> ok=False with reason "missing".
"""
from __future__ import annotations

import csv
import json
import math
import os

from fifa_jax.scoring.rubric import Verdict

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n", ""}


def _read_rows(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if ext in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from None
        return rows
    if ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"judge column.path {path}: unsupported extension {ext!r} "
                     "(use .parquet, .jsonl or .csv)")


def _harmful(value, path: str, row: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise ValueError(f"{path}: row {row}: harmful must be a bool, got {value!r}")


def load_scores(path: str) -> dict[str, tuple[float, bool]]:
    """prompt -> (quality, harmful) from the score file, validated."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"judge column.path {path!r} does not exist")
    rows = _read_rows(path)
    if rows and ("prompt" not in rows[0] or "quality" not in rows[0]):
        raise ValueError(f"{path}: needs columns 'prompt' and 'quality'; has {sorted(rows[0])}")
    scores: dict[str, tuple[float, bool]] = {}
    first_row: dict[str, int] = {}
    for i, r in enumerate(rows):
        prompt = r.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: row {i}: prompt must be a string, got {prompt!r}")
        try:
            q = float(r.get("quality"))
        except (TypeError, ValueError):
            q = float("nan")
        if not (math.isfinite(q) and 0.0 <= q <= 10.0):
            raise ValueError(f"{path}: row {i}: quality must be a number in [0, 10], "
                             f"got {r.get('quality')!r}")
        h = _harmful(r["harmful"], path, i) if r.get("harmful") is not None else False
        if prompt in scores and scores[prompt] != (q, h):
            raise ValueError(f"{path}: rows {first_row[prompt]} and {i} give prompt "
                             f"{prompt[:60]!r} different scores")
        scores[prompt] = (q, h)
        first_row.setdefault(prompt, i)
    return scores


class ColumnJudge:
    """Looks prompts up in `column.path`; quality is taken as is (already on 0..10)."""

    def __init__(self, cfg):
        if cfg.column.missing not in ("error", "fail"):
            raise ValueError(f"judge column.missing must be 'error' or 'fail', "
                             f"got {cfg.column.missing!r}")
        self.cfg = cfg
        self.path = cfg.column.path
        self.scores = load_scores(self.path)
        self.max_rating = 10
        self.model_id = cfg.model_id or os.path.abspath(self.path)

    def verdicts(self, texts: list[str], *, harmful_quality_zero: bool) -> list[Verdict]:
        """One Verdict per text; missing prompts raise or fail by `column.missing`."""
        missing = [t for t in texts if t not in self.scores]
        if missing and self.cfg.column.missing == "error":
            raise ValueError(f"judge column.path {self.path}: {len(missing)} of {len(texts)} "
                             f"prompts have no score, e.g. {missing[0][:80]!r} "
                             "(set column.missing='fail' to score them as failures)")
        out = []
        for t in texts:
            if t not in self.scores:
                out.append(Verdict(0.0, False, False, "missing", 0.0, 0.0))
                continue
            q, h = self.scores[t]
            q = 0.0 if (h and harmful_quality_zero) else q
            out.append(Verdict(q, h, True, "", 1.0, float(h)))
        return out
