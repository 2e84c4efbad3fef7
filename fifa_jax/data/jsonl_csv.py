"""The plain user layout: JSONL or CSV with prompt, image_0, image_1, label_0 -> candidates.

Columns: prompt, image_0, image_1 (paths), label_0 required; label_1, model_0, model_1 optional.
Image paths are relative to `image_root` when set, else to the folder of the JSONL/CSV file;
absolute paths and `file://` URLs work as is; http(s)/s3/gs URLs are not fetched (the row is
skipped as missing_image, counted and reported).

CSV: the header must hold the required columns (else IngestError naming file and column);
`source_row` is the data row index (0 = the first line after the header). Empty label_1 cells
count as absent.
JSONL: one JSON object per line; blank lines are ignored; `source_row` is the 0-based line
number. The first object must hold the required keys (else IngestError naming file and key);
a later line that is not valid JSON, not an object, or lacks a required key is skipped as
bad_record (counted, with examples). Both are streamed line by line.
Encoding: UTF-8 (a leading BOM is dropped). A JSONL line or CSV record holding a byte that is not
valid UTF-8 is skipped as bad_encoding, its example naming file, row, line and byte; a CSV record
the csv module cannot parse (a field over csv.field_size_limit, ...) is skipped as bad_record.
A CSV header that is not UTF-8 raises IngestError.
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Iterator

from fifa_jax.data import schema
from fifa_jax.data.rows import Candidate, batched, file_image, image_root_for

_NOT_UTF8 = re.compile("[\udc80-\udcff]")   # what errors="surrogateescape" makes of a bad byte


def _candidate(path: str, row: int, rec: dict, root: str, empty_l1_absent: bool) -> Candidate:
    l1 = rec.get("label_1")
    if empty_l1_absent and isinstance(l1, str) and not l1.strip():
        l1 = None
    return Candidate(
        source=path, source_row=row, prompt=rec.get("prompt"),
        label_0=rec.get("label_0"), label_1=l1, has_label_1="label_1" in rec,
        image_0=file_image(rec.get("image_0"), root), image_1=file_image(rec.get("image_1"), root),
        model_0=str(rec.get("model_0") or ""), model_1=str(rec.get("model_1") or ""))


def _not_utf8(text: str) -> str:
    """'' when `text` decoded cleanly, else which byte did not (see _open)."""
    m = _NOT_UTF8.search(text)
    return f"byte 0x{ord(m.group()) - 0xDC00:02x}" if m else ""


def _open(path: str, **kw):
    """Text stream that never fails on a bad byte: errors="surrogateescape" decodes it to a lone
    surrogate (U+DC80..U+DCFF, never in valid UTF-8), which _not_utf8 finds per line/record."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", **kw)   # -sig: drop a BOM


def _bad_encoding(path: str, row: int, line: int, where: str) -> Candidate:
    return Candidate(source=path, source_row=row, bad_reason="bad_encoding",
                     bad=f"line {line} is not UTF-8 ({where})")


_FIELD_LIMIT = 1 << 26


def iter_csv(path: str, *, image_root: str = "", batch_rows: int = 256
             ) -> Iterator[list[Candidate]]:
    path = os.path.abspath(path)
    root = image_root_for(path, image_root)
    # a quoted field over the csv module's 128 KiB default would end the record mid-way and
    # leave the reader inside it: read such fields whole (long captions are cut later)
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    with _open(path, newline="") as f:   # Excel exports start with a BOM
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        bad = next((b for b in map(_not_utf8, fields) if b), "")
        if bad:
            raise schema.IngestError(path, f"header (line {reader.line_num}) is not UTF-8 ({bad})")
        schema.require_columns(path, fields, schema.USER_REQUIRED)

        def candidates():
            row = 0
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:   # e.g. a field over csv.field_size_limit()
                    yield Candidate(source=path, source_row=row,
                                    bad=f"line {reader.line_num}: {e}")
                    row += 1
                    continue
                cells = [(k, v) for k, v in rec.items() if k is not None and isinstance(v, str)]
                cells += [("beyond the header", v) for v in rec.get(None) or ()]
                bad = next((f"{b} in column '{k}'" for k, v in cells if (b := _not_utf8(v))), "")
                if bad:
                    yield _bad_encoding(path, row, reader.line_num, bad)
                elif None in rec:  # more cells than header names
                    yield Candidate(source=path, source_row=row,
                                    bad=f"{len(rec[None])} cells beyond the header")
                else:
                    yield _candidate(path, row, rec, root, empty_l1_absent=True)
                row += 1
        yield from batched(candidates(), batch_rows)


def iter_jsonl(path: str, *, image_root: str = "", batch_rows: int = 256
               ) -> Iterator[list[Candidate]]:
    path = os.path.abspath(path)
    root = image_root_for(path, image_root)
    checked = False

    def candidates(f):
        nonlocal checked
        for row, line in enumerate(f):
            if not line.strip():
                continue
            bad = _not_utf8(line)
            if bad:
                yield _bad_encoding(path, row, row + 1, bad)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec, bad = None, f"invalid JSON: {e}"
            else:
                bad = "" if isinstance(rec, dict) else f"not a JSON object: {type(rec).__name__}"
            if not bad:
                if not checked:
                    schema.require_columns(path, rec.keys(), schema.USER_REQUIRED)
                    checked = True
                missing = schema.missing_columns(rec.keys(), schema.USER_REQUIRED)
                if missing:
                    bad = f"missing key(s) {missing}"
            if bad:
                yield Candidate(source=path, source_row=row, bad=bad)
            else:
                yield _candidate(path, row, rec, root, empty_l1_absent=False)

    with _open(path) as f:
        yield from batched(candidates(f), batch_rows)


def count_lines(path: str) -> int:
    """Number of lines (a cheap upper bound on rows, for the progress bar)."""
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n
