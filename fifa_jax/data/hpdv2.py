"""HPDv2 reader: annotation JSON (one prompt, several ranked images) -> pairwise candidates.

HPDv2 (huggingface.co/datasets/ymhao/HPDv2, github.com/tgxs002/HPSv2) publishes two layouts:
  train.json: [{"prompt": str, "file_path": [str, ...], "human_preference": [int, ...]}, ...]
              (1 marks the preferred image)
  test.json:  [{"prompt": str, "image_path": [str, ...], "rank": [int, ...],
                "raw_annotations": [...]}, ...]   (averaged rank, lower = better)
Both are read; per record the images come from `image_path` (else `file_path`) and the order
from `rank` (lower wins) when present, else `human_preference` (higher wins). Every pair i < j
of a record's images becomes one candidate with label_0 = 1 (image i better), 0 (image j
better) or 0.5 (equal: a tie), so the shared rules (winner first, ties, ...) apply unchanged;
a record with k images gives k(k-1)/2 candidates. `source_row` is the record index. The models
are not in the annotation: winner_model / loser_model are "".

Image paths are relative to `image_root` when set, else to the JSON file's folder (HPDv2's
images sit in `train/` and `test/` folders next to the JSON: set image_root accordingly); one
resolving outside that folder is not read (skipped as outside_root) unless allow_outside_root.
The first record must hold prompt, an image list and a preference list (else IngestError naming
file and key); a later record that lacks them, has lists of different lengths, fewer than two
images or non-numeric or non-finite (NaN, Infinity) preferences counts as one row skipped as
bad_record. A file that is not UTF-8 or not JSON raises IngestError (naming the file).
The annotation list itself is loaded with json.load (text only; images are read one batch at a
time while checking).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Iterator

from fifa_jax.data import schema
from fifa_jax.data.rows import Candidate, file_image, image_root_for


def load_records(path: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:   # -sig: drop a leading BOM
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise schema.IngestError(path, f"not UTF-8: byte 0x{e.object[e.start]:02x} at byte "
                                 f"offset {e.start}") from e
    except (ValueError, RecursionError) as e:   # bad JSON, a 5000-digit number, deep nesting
        raise schema.IngestError(path, f"not valid JSON: {type(e).__name__}: {e}") from e
    if isinstance(data, dict):  # tolerate {"data": [...]} style wrappers with one list
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise schema.IngestError(path, "expected a JSON list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise schema.IngestError(path, "expected a JSON list of records")
    return data


def _keys(rec: dict) -> tuple[str | None, str | None]:
    img = next((k for k in schema.HPDV2_IMAGE_KEYS if k in rec), None)
    pref = next((k for k in schema.HPDV2_PREFERENCE_KEYS if k in rec), None)
    return img, pref


def _check_first(path: str, rec) -> None:
    if not isinstance(rec, dict):
        raise schema.IngestError(path, f"record 0 is a {type(rec).__name__}, expected an object")
    img, pref = _keys(rec)
    if "prompt" not in rec:
        raise schema.IngestError(path, "required key missing in record 0", column="prompt")
    if img is None:
        raise schema.IngestError(path, "required key missing in record 0 (one of "
                                 f"{list(schema.HPDV2_IMAGE_KEYS)})", column="image_path")
    if pref is None:
        raise schema.IngestError(path, "required key missing in record 0 (one of "
                                 f"{list(schema.HPDV2_PREFERENCE_KEYS)})", column="rank")


def record_candidates(path: str, idx: int, rec, root: str, allow_outside_root: bool = False
                      ) -> list[Candidate]:
    """One annotation record -> its pairwise candidates (or one bad_record candidate)."""
    def bad(msg):
        return [Candidate(source=path, source_row=idx, bad=msg)]
    if not isinstance(rec, dict):
        return bad(f"record is a {type(rec).__name__}, expected an object")
    img_key, pref_key = _keys(rec)
    if "prompt" not in rec or img_key is None or pref_key is None:
        return bad("record lacks prompt, image list or preference list")
    paths, prefs = rec[img_key], rec[pref_key]
    if not isinstance(paths, list) or not isinstance(prefs, list) or len(paths) != len(prefs):
        return bad(f"'{img_key}' and '{pref_key}' must be lists of equal length")
    if len(paths) < 2:
        return bad(f"{len(paths)} image(s); a pair needs at least two")
    if not all(isinstance(p, numbers.Real) and not isinstance(p, bool) for p in prefs):
        return bad(f"'{pref_key}' holds non-numeric values: {prefs!r}")
    # json.load accepts NaN and Infinity; neither orders anything
    if not all(isinstance(p, numbers.Integral) or math.isfinite(p) for p in prefs):
        return bad(f"'{pref_key}' holds non-finite values: {prefs!r}")
    # rank: lower wins; human_preference: higher wins (compared, never subtracted: a huge
    # integer minus a float overflows)
    lower_wins = pref_key == "rank"
    imgs = [file_image(p, root, allow_outside_root) for p in paths]
    out = []
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            a, b = (prefs[j], prefs[i]) if lower_wins else (prefs[i], prefs[j])
            label = 1.0 if a > b else (0.0 if a < b else 0.5)
            out.append(Candidate(source=path, source_row=idx, prompt=rec["prompt"],
                                 label_0=label, image_0=imgs[i], image_1=imgs[j]))
    return out


def iter_batches(path: str, *, image_root: str = "", batch_rows: int = 256,
                 records: list | None = None, allow_outside_root: bool = False
                 ) -> Iterator[list[Candidate]]:
    """Stream the candidates of one annotation file, whole records per batch."""
    path = os.path.abspath(path)
    root = image_root_for(path, image_root)
    records = load_records(path) if records is None else records
    if records:
        _check_first(path, records[0])
    batch: list[Candidate] = []
    for idx, rec in enumerate(records):
        batch += record_candidates(path, idx, rec, root, allow_outside_root)
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def count_candidates(records: list) -> int:
    """About how many candidates the records give (for the progress bar's total)."""
    n = 0
    for rec in records:
        k = 0
        if isinstance(rec, dict):
            img_key, _ = _keys(rec)
            paths = rec.get(img_key) if img_key else None
            k = len(paths) if isinstance(paths, list) else 0
        n += k * (k - 1) // 2 if k >= 2 else 1
    return n
