"""Evaluation prompt sets -> a list of (prompt_id, text), with every skipped entry counted.

Kinds (load_prompt_set(kind, path, limit)):
  "pickapic":     Pick-a-Pic `test_unique` parquet (a file, or a folder of *.parquet shards in
                  name order); column `caption`. ids "row-<i>" (0-based row over all shards).
  "partiprompts": PartiPrompts TSV (tab-separated, no quoting; header with `Prompt`, optional
                  `Category`, `Challenge`, kept as metadata). ids "row-<i>" (0 = first data row).
  "hpsv2":        the HPSv2 benchmark prompts: a folder holding anime.json, concept-art.json,
                  paintings.json and photo.json (all four required), or one such file; each a
                  JSON list of strings. ids "<style>-<i>" (style = file stem, i = list index);
                  metadata {"style"}. A folder's styles are interleaved (anime 0, concept-art 0,
                  paintings 0, photo 0, anime 1, ...) so that `limit` keeps them balanced.
  "text":         a UTF-8 text file, one prompt per line; blank lines and lines starting with
                  `#` (after leading whitespace) are skipped silently. ids "line-<n>" (1-based).

Skipped entries, counted in PromptSet.skipped by reason:
  empty:       null, or nothing left after removing whitespace and control/format characters
  duplicate:   the same text (surrounding whitespace stripped) as an earlier kept prompt
  undecodable: a line / cell that is not valid UTF-8, or a JSON list item that is not a string
Bad files (missing, unreadable, wrong format or columns) raise InputError naming the file (and
row or column). `limit` > 0 keeps the first `limit` prompts after skipping.
"""
from __future__ import annotations

import dataclasses
import json
import os
import unicodedata
from typing import Iterable, Iterator

from absl import logging

from fifa_jax.errors import InputError

KINDS = ("pickapic", "partiprompts", "hpsv2", "text")
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
_REASONS = ("empty", "duplicate", "undecodable")


@dataclasses.dataclass
class PromptSet:
    """prompts: [(prompt_id, text)] in order; metadata: {prompt_id: {key: str}} (may be empty);
    skipped: {reason: count} for every reason in _REASONS; examples: a few "where: why" lines."""
    kind: str
    path: str
    prompts: list[tuple[str, str]]
    metadata: dict[str, dict[str, str]]
    skipped: dict[str, int]
    examples: list[str]

    def summary(self) -> str:
        skips = ", ".join(f"{n} {r}" for r, n in self.skipped.items() if n) or "none"
        return f"{self.kind}: {len(self.prompts)} prompts from {self.path} (skipped: {skips})"


def _is_empty(text: str) -> bool:
    return not any(not c.isspace() and unicodedata.category(c)[0] != "C" for c in text)


class _Collector:
    """Applies the skip rules in order (undecodable, empty, duplicate) and stops at `limit`."""

    def __init__(self, kind: str, path: str, limit: int):
        self.out = PromptSet(kind, path, [], {}, dict.fromkeys(_REASONS, 0), [])
        self.limit, self._seen = limit, set()

    @property
    def full(self) -> bool:
        return 0 < self.limit <= len(self.out.prompts)

    def skip(self, reason: str, where: str) -> None:
        self.out.skipped[reason] += 1
        if len(self.out.examples) < 5:
            self.out.examples.append(f"{where}: {reason}")

    def add(self, pid: str, text, where: str, meta: dict | None = None) -> None:
        if text is None or _is_empty(text):
            return self.skip("empty", where)
        text = text.strip()
        if text in self._seen:
            return self.skip("duplicate", where)
        self._seen.add(text)
        self.out.prompts.append((pid, text))
        if meta:
            self.out.metadata[pid] = meta


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such prompt file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: str) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text or None when the line is not UTF-8); a BOM is dropped."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None


def _read_text(path: str, c: _Collector) -> None:
    for n, line in _lines(path):
        if c.full:
            return
        if line is None:
            c.skip("undecodable", f"{path} line {n}")
        elif line.strip() and not line.lstrip().startswith("#"):
            c.add(f"line-{n}", line, f"{path} line {n}")


def _read_parti(path: str, c: _Collector) -> None:
    lines = _lines(path)
    first = next(lines, None)
    if first is None or first[1] is None:
        raise InputError(f"{path}: PartiPrompts TSV needs a UTF-8 header line with a Prompt column")
    header = first[1].split("\t")
    if "Prompt" not in header:
        raise InputError(f"{path}: PartiPrompts TSV header has no 'Prompt' column "
                         f"(found {header[:6]})")
    col = {k: header.index(k) for k in ("Prompt", "Category", "Challenge") if k in header}
    row = -1
    for n, line in lines:
        if c.full:
            return
        if line is not None and not line.strip():
            continue   # a trailing blank line is no data row
        row += 1
        where = f"{path} row {row} (line {n})"
        if line is None:
            c.skip("undecodable", where)
            continue
        cells = line.split("\t")
        cell = lambda k: cells[col[k]] if k in col and col[k] < len(cells) else ""  # noqa: E731
        meta = {k.lower(): cell(k).strip() for k in ("Category", "Challenge") if k in col}
        c.add(f"row-{row}", cell("Prompt"), where, meta)


def _hpsv2_list(path: str) -> list:
    try:
        items = json.loads(_read_bytes(path).decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a UTF-8 JSON file ({e})") from None
    if not isinstance(items, list):
        raise InputError(f"{path}: HPSv2 prompt file must hold a JSON list of strings, "
                         f"got {type(items).__name__}")
    return items


def _read_hpsv2(path: str, c: _Collector) -> None:
    if os.path.isdir(path):
        files = [os.path.join(path, f"{s}.json") for s in HPSV2_STYLES]
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise InputError(f"{path}: HPSv2 benchmark folder lacks {', '.join(missing)} "
                             f"(needs {', '.join(s + '.json' for s in HPSV2_STYLES)})")
    else:
        files = [path]
    lists = [(f, os.path.splitext(os.path.basename(f))[0], _hpsv2_list(f)) for f in files]
    for i in range(max(len(items) for _, _, items in lists)):
        for f, style, items in lists:
            if c.full:
                return
            if i >= len(items):
                continue
            where = f"{f} item {i}"
            if items[i] is not None and not isinstance(items[i], str):
                c.skip("undecodable", where)
            else:
                c.add(f"{style}-{i}", items[i], where, {"style": style})


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise InputError(f"{path}: folder holds no .parquet files")
        return files
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such parquet file or folder")
    return [path]


def _captions(file: str) -> Iterable:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{file}: not a readable parquet file ({e})") from None
    if "caption" not in pf.schema_arrow.names:
        raise InputError(f"{file}: parquet has no 'caption' column "
                         f"(found {pf.schema_arrow.names[:8]})")
    kind = pf.schema_arrow.field("caption").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise InputError(f"{file}: column 'caption' must be text, got {kind}")
    for batch in pf.iter_batches(columns=["caption"], batch_size=4096):
        col = batch.column(0)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.large_binary())   # arrow does not validate UTF-8 on read
        yield from col.to_pylist()


def _read_pickapic(path: str, c: _Collector) -> None:
    row = 0
    for file in _parquet_files(path):
        for raw in _captions(file):
            if c.full:
                return
            where = f"{file} row {row}"
            if raw is None:
                c.skip("empty", where)
            else:
                try:
                    c.add(f"row-{row}", raw.decode("utf-8"), where)
                except UnicodeDecodeError:
                    c.skip("undecodable", where)
            row += 1


_READERS = {"pickapic": _read_pickapic, "partiprompts": _read_parti, "hpsv2": _read_hpsv2,
            "text": _read_text}


def load_prompt_set(kind: str, path: str, limit: int = 0) -> PromptSet:
    """Read the prompt set `kind` (one of KINDS) from `path`; see the module docstring."""
    if kind not in _READERS:
        raise InputError(f"prompt set kind must be one of {KINDS}, got {kind!r}")
    if limit < 0:
        raise InputError(f"prompt set limit must be >= 0 (0 = all), got {limit}")
    c = _Collector(kind, str(path), int(limit))
    _READERS[kind](str(path), c)
    if not c.out.prompts:
        raise InputError(f"{path}: no usable prompts ({c.out.summary()})")
    logging.info("prompts: %s", c.out.summary())
    for ex in c.out.examples:
        logging.info("prompts: skipped %s", ex)
    return c.out
