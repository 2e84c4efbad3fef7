"""The plain user layout: JSONL or CSV with prompt, image_0, image_1, label_0 -> candidates.

Columns: prompt, image_0, image_1 (paths), label_0 required; label_1, model_0, model_1 optional.
Image paths are relative to `image_root` when set, else to the folder of the JSONL/CSV file;
absolute paths and `file://` URLs are accepted; every path must resolve (after `..` and
symbolic links) inside that folder, else the row is skipped as outside_root and the file never
opened, unless allow_outside_root; http(s)/s3/gs URLs are not fetched (the row is skipped as
missing_image, counted and reported).

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
CSV quoting errors: records are parsed strictly (a closing quote must be followed by a comma
or the line end). A quoted field may span line breaks, but a record spanning lines that fails
to parse (an unterminated quote, text after a closing quote), spans over MAX_RECORD_LINES
lines, has not the header's number of cells, or holds a line (before its last) that would on
its own be a whole row is taken for a stray quote: its first line is skipped as bad_record
("line N: quoting error ...") and parsing resumes on the next line, so the lines it swallowed
are read as rows of their own; every data line is a row read.
"""
from __future__ import annotations

import collections
import csv
import json
import os
import re
from typing import Iterator

from fifa_jax.data import schema
from fifa_jax.data.rows import Candidate, batched, file_image, image_root_for

MAX_RECORD_LINES = 64   # a CSV record spanning more lines is taken for an unterminated quote

_NOT_UTF8 = re.compile("[\udc80-\udcff]")   # what errors="surrogateescape" makes of a bad byte


def _candidate(path: str, row: int, rec: dict, root: str, empty_l1_absent: bool,
               allow_outside_root: bool) -> Candidate:
    l1 = rec.get("label_1")
    if empty_l1_absent and isinstance(l1, str) and not l1.strip():
        l1 = None
    return Candidate(
        source=path, source_row=row, prompt=rec.get("prompt"),
        label_0=rec.get("label_0"), label_1=l1, has_label_1="label_1" in rec,
        image_0=file_image(rec.get("image_0"), root, allow_outside_root),
        image_1=file_image(rec.get("image_1"), root, allow_outside_root),
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


class _QuotingError(Exception):
    """A CSV record ran past MAX_RECORD_LINES lines (raised by _Lines inside csv.reader)."""


class _Lines:
    """The physical lines of a CSV file (line ends kept) for csv.reader, numbered from 1. The
    lines of the record being parsed are kept (`record`), so that after a quoting error parsing
    can resume at the record's second line (`resume_after_first`)."""

    def __init__(self, f, max_lines: int):
        self._f = f
        self._max = max_lines
        self._replay: collections.deque = collections.deque()
        self._next = 1
        self.record: list[tuple[int, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if len(self.record) >= self._max:
            raise _QuotingError(f"a quoted field runs past {self._max} lines")
        if self._replay:
            item = self._replay.popleft()
        else:
            text = self._f.readline()
            if not text:
                raise StopIteration
            item = (self._next, text)
            self._next += 1
        self.record.append(item)
        return item[1]

    def start_record(self) -> None:
        self.record = []

    def resume_after_first(self) -> None:
        self._replay.extendleft(reversed(self.record[1:]))
        self.record = []


def _swallowed(lines: list[tuple[int, str]], n_cells: int, width: int) -> str:
    """Why a record that parsed over several lines looks like a stray quote ('' if it does
    not): not the header's number of cells, or a line before its last that would on its own
    be a whole row (as many cells as the header, quotes taken literally)."""
    if n_cells != width:
        return f"{n_cells} cell(s) over {len(lines)} lines, the header has {width}"
    for no, text in lines[:-1]:
        if len(next(csv.reader([text], quoting=csv.QUOTE_NONE), [])) >= width:
            return f"line {no}, inside the quoted field, reads as a whole row"
    return ""


def _csv_reader(lines: _Lines):
    return csv.reader(lines, strict=True)


def _next_record(reader, lines: _Lines) -> tuple[list[str] | None, str]:
    """-> (cells, '') | (None, error text); raises StopIteration at the end of the file."""
    lines.start_record()
    try:
        return next(reader), ""
    except (csv.Error, _QuotingError) as e:
        return None, str(e)


def iter_csv(path: str, *, image_root: str = "", batch_rows: int = 256,
             allow_outside_root: bool = False) -> Iterator[list[Candidate]]:
    path = os.path.abspath(path)
    root = image_root_for(path, image_root)
    # a quoted field over the csv module's 128 KiB default would end the record mid-way and
    # leave the reader inside it: read such fields whole (long captions are cut later)
    csv.field_size_limit(max(csv.field_size_limit(), _FIELD_LIMIT))
    with _open(path, newline="") as f:   # Excel exports start with a BOM
        lines = _Lines(f, MAX_RECORD_LINES)
        reader = _csv_reader(lines)
        fields: list[str] = []
        while not fields:   # DictReader's rule: the first non-blank record is the header
            try:
                fields, err = _next_record(reader, lines)
            except StopIteration:
                break
            if err or len(lines.record) > 1:
                where = f"line {lines.record[0][0]}" if lines.record else "the header"
                raise schema.IngestError(path, f"header ({where}) cannot be parsed: "
                                         f"{err or 'a quoted name spans lines'}")
        bad = next((b for b in map(_not_utf8, fields) if b), "")
        if bad:
            where = lines.record[0][0] if lines.record else 1
            raise schema.IngestError(path, f"header (line {where}) is not UTF-8 ({bad})")
        schema.require_columns(path, fields, schema.USER_REQUIRED)
        width = len(fields)

        def candidates():
            nonlocal reader
            row = 0
            while True:
                try:
                    cells, err = _next_record(reader, lines)
                except StopIteration:
                    return
                rec_lines = lines.record
                if cells == [] and not err:   # a blank line is no row
                    continue
                first = rec_lines[0][0] if rec_lines else 0
                if not err and len(rec_lines) > 1:
                    err = _swallowed(rec_lines, len(cells), width)
                if err:
                    if len(rec_lines) > 1:
                        msg = (f"line {first}: quoting error ({err}): the quoted field opened "
                               f"on this line is not closed where a row ends; this line is "
                               f"skipped, lines {first + 1}-{rec_lines[-1][0]} are read as "
                               "rows of their own")
                        lines.resume_after_first()
                    else:   # e.g. a field over csv.field_size_limit(), text after a quote
                        msg = f"line {first}: {err}"
                    reader = _csv_reader(lines)
                    yield Candidate(source=path, source_row=row, bad=msg)
                    row += 1
                    continue
                named = [(fields[i] if i < width else "beyond the header", v)
                         for i, v in enumerate(cells)]
                bad = next((f"{b} in column '{k}'" for k, v in named if (b := _not_utf8(v))), "")
                if bad:
                    yield _bad_encoding(path, row, first, bad)
                elif len(cells) > width:  # more cells than header names
                    yield Candidate(source=path, source_row=row,
                                    bad=f"{len(cells) - width} cells beyond the header")
                else:   # missing trailing cells read as absent values (None), as DictReader
                    rec = {k: (cells[i] if i < len(cells) else None)
                           for i, k in enumerate(fields)}
                    yield _candidate(path, row, rec, root, True, allow_outside_root)
                row += 1
        yield from batched(candidates(), batch_rows)


def iter_jsonl(path: str, *, image_root: str = "", batch_rows: int = 256,
               allow_outside_root: bool = False) -> Iterator[list[Candidate]]:
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
            except (ValueError, RecursionError) as e:   # ValueError: also a 5000-digit number
                rec, bad = None, f"invalid JSON: {type(e).__name__}: {e}"
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
                yield _candidate(path, row, rec, root, False, allow_outside_root)

    with _open(path) as f:
        yield from batched(candidates(f), batch_rows)


def count_lines(path: str) -> int:
    """Number of lines (a cheap upper bound on rows, for the progress bar)."""
    n = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n
