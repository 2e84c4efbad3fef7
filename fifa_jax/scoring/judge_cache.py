"""On-disk cache of raw judgements: sqlite3 (stdlib) in `cache_dir/judge_cache.sqlite3`.

Key = sha256 of JSON {prompt, settings}, where settings holds everything that changes the raw
answer (backend, model id, a content digest of a local model folder, rubric, rating scale,
answer prefix, max length, dtype; for the `jax` backend also the buckets and per-device batch
size, since the padded shape changes bfloat16 answers), but not thresholds (applied afterwards by
`rubric.finalize`) nor the HTTP URL. Reruns and other datasets that share prompts reuse entries.
Only answers are cached, never transport failures ("failed": also an HTTP 200 body that is not a
completion), so a rerun retries them. Each batch is committed on its own, so a killed run
keeps every finished batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from typing import Iterable

from fifa_jax.scoring.rubric import RawJudgement

FILE_NAME = "judge_cache.sqlite3"


def cache_key(prompt: str, settings: dict) -> str:
    blob = json.dumps({"prompt": prompt, "settings": settings}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """get_many / put_many of RawJudgement by prompt under fixed `settings`."""

    def __init__(self, cache_dir: str, settings: dict):
        os.makedirs(cache_dir, exist_ok=True)
        self.path = os.path.join(cache_dir, FILE_NAME)
        self.settings = settings
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS judgements "
                         "(key TEXT PRIMARY KEY, raw TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, prompts: Iterable[str]) -> dict[str, RawJudgement]:
        prompts = list(prompts)
        keys = {cache_key(p, self.settings): p for p in prompts}
        out: dict[str, RawJudgement] = {}
        items = list(keys)
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            rows = self._db.execute(
                f"SELECT key, raw FROM judgements WHERE key IN ({','.join('?' * len(chunk))})",
                chunk).fetchall()
            for key, raw in rows:
                out[keys[key]] = RawJudgement.from_json(json.loads(raw))
        return out

    def put_many(self, items: dict[str, RawJudgement]) -> int:
        """Store every judgement except transport failures; returns how many were stored."""
        rows = [(cache_key(p, self.settings), json.dumps(r.to_json()))
                for p, r in items.items() if r.error != "failed"]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?)", rows)
        return len(rows)

    def close(self) -> None:
        self._db.close()
