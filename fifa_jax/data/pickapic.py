"""Pick-a-Pic v2 reader: parquet shards as published -> batches of `rows.Candidate`.

`path` is a folder (its `*.parquet`, sorted, not recursive), a glob (`data/train-*.parquet`),
one file, or a comma-separated list of any of these. Every shard's schema is checked before the
first row is read, so a missing or mistyped column fails at once, naming file and column.

Streaming: shards are read one at a time in `batch_rows` row batches (pyarrow iter_batches over
the needed columns only); a batch's image bytes are dropped once checked. Image references are
`"<absolute shard path>::<row in shard>::jpg_0|jpg_1"`; `source_row` is that row.
Columns: caption, jpg_0, jpg_1, label_0 required; label_1, model_0, model_1 used when present;
the ids (ranking_id, image_*_uid, ...) are not needed and not read.
Text columns (caption, model_*) may be string, binary (decoded as UTF-8 row by row) or
dictionary-encoded either way; a cell that is not UTF-8 skips its row as bad_encoding. Any
other column type, or a column named twice, is an IngestError naming file and column.
Data files must be regular files (a FIFO or device named by a glob or folder is refused).
"""
from __future__ import annotations

import glob
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from fifa_jax.data import images, schema
from fifa_jax.data.rows import Candidate, ImageSource


def resolve_files(path: str, suffix: str = ".parquet") -> list[str]:
    """folder | glob | file | "a,b,c" -> sorted-within-each-part absolute file paths, each file
    once (a file named twice, by any spelling or link, is kept where it first appears)."""
    if not path or not str(path).strip():
        raise schema.IngestError("config.data.path", "is empty; set it to the data location")
    files: list[str] = []
    for part in [p.strip() for p in str(path).split(",") if p.strip()]:
        part = os.path.expanduser(part)
        if any(ch in part for ch in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise schema.IngestError(part, "glob matches no file")
            files += found
        elif os.path.isdir(part):
            found = sorted(os.path.join(part, f) for f in os.listdir(part) if f.endswith(suffix))
            if not found:
                raise schema.IngestError(part, f"folder holds no *{suffix} file")
            files += found
        elif os.path.isfile(part):
            files.append(part)
        elif os.path.exists(part):
            raise schema.IngestError(part, "not a regular file or folder (not opened)")
        else:
            raise schema.IngestError(part, "no such file or folder")
    for f in files:   # a glob or folder can name a FIFO or device: never open one (it blocks)
        if not os.path.isfile(f):
            raise schema.IngestError(f, "not a regular file (not opened)")
    seen, out = set(), []
    for f in files:   # dedupe after resolving: "x.parquet,./x.parquet" reads the file once
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            out.append(os.path.abspath(f))
    return out


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
            and _is_image_type(t.field("bytes").type))


def _is_text(t):
    """string, binary (decoded as UTF-8 per row), dictionary-encoded either, or all-null."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)
            or getattr(pa.types, "is_binary_view", lambda _: False)(t))


def _is_number(t):
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


_TYPES = {"caption": (_is_text, "string (or UTF-8 binary)"), "jpg_0": (_is_image_type, "binary"),
          "jpg_1": (_is_image_type, "binary"), "label_0": (_is_number, "a number"),
          "label_1": (_is_number, "a number"), "model_0": (_is_text, "string (or UTF-8 binary)"),
          "model_1": (_is_text, "string (or UTF-8 binary)")}


def check_schemas(files: list[str]) -> dict[str, list[str]]:
    """Validate every shard's columns; -> {file: columns to read}. Raises IngestError."""
    out = {}
    for f in files:
        try:
            arrow_schema = pq.read_schema(f)
        except Exception as e:  # not a parquet file, truncated footer, ...
            raise schema.IngestError(f, f"cannot read parquet schema: {e}") from e
        names = arrow_schema.names
        schema.require_columns(f, names, schema.PICKAPIC_REQUIRED)
        cols = [c for c in schema.PICKAPIC_REQUIRED + schema.PICKAPIC_OPTIONAL if c in names]
        for c in cols:
            idx = arrow_schema.get_all_field_indices(c)
            if len(idx) > 1:
                raise schema.IngestError(f, f"appears {len(idx)} times", column=c)
            ok, want = _TYPES[c]
            if not ok(arrow_schema.field(idx[0]).type):
                raise schema.IngestError(
                    f, f"has type {arrow_schema.field(idx[0]).type}, expected {want}", column=c)
        out[f] = cols
    return out


def total_rows(files: list[str]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


def _text_list(col: pa.Array) -> tuple[list, list[str]]:
    """A text column -> (values, per row '' or why the cell is not UTF-8 text; its value is
    then None). Binary cells are decoded as UTF-8; so are string cells that hold invalid bytes
    (parquet writers do not all validate them)."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
            or getattr(pa.types, "is_binary_view", lambda _: False)(col.type)):
        try:
            values = col.to_pylist()
            return values, [""] * len(values)
        except UnicodeDecodeError:
            col = col.cast(pa.large_binary(), safe=False)   # same bytes, no validation
    values, bad = [], []
    for v in col.to_pylist():
        if v is None or isinstance(v, str):
            values.append(v)
            bad.append("")
            continue
        try:
            values.append(v.decode("utf-8"))
            bad.append("")
        except UnicodeDecodeError as e:
            values.append(None)
            bad.append(f"byte 0x{v[e.start]:02x} at offset {e.start}")
    return values, bad


def _binary_list(col: pa.Array) -> list:
    if pa.types.is_struct(col.type):
        col = col.field("bytes")
    return col.to_pylist()


def _record_batches(f: str, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """One shard's record batches, row group by row group; a corrupt page (bad compression,
    truncated data, ...) raises IngestError naming the shard and the row group."""
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise schema.IngestError(f, f"cannot open parquet file: {e}") from e
    first = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        it = pf.iter_batches(batch_size=batch_rows, columns=cols, row_groups=[rg])
        while True:
            try:
                rb = next(it)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:
                raise schema.IngestError(
                    f, f"row group {rg} (rows {first}-{first + n - 1}) cannot be read "
                    f"(corrupt data?): {type(e).__name__}: {' '.join(str(e).split())}") from e
            yield rb
        first += n


def iter_batches(files: list[str], batch_rows: int = 256) -> Iterator[list[Candidate]]:
    """Stream all shards (schemas already checked or checked here) as candidate batches."""
    columns = check_schemas(files)
    for f in files:
        cols = columns[f]
        has_l1 = "label_1" in cols
        row0 = 0
        for rb in _record_batches(f, cols, batch_rows):
            d = {name: rb.column(name) for name in rb.schema.names}
            n = rb.num_rows
            text = {c: _text_list(d[c]) if c in d else ([""] * n, [""] * n)
                    for c in ("caption", "model_0", "model_1")}
            captions, m0, m1 = (text[c][0] for c in ("caption", "model_0", "model_1"))
            l0 = d["label_0"].to_pylist()
            l1 = d["label_1"].to_pylist() if has_l1 else [None] * n
            j0, j1 = _binary_list(d["jpg_0"]), _binary_list(d["jpg_1"])
            batch = []
            for i in range(n):
                row = row0 + i
                bad = next((f"column '{c}' is not UTF-8 ({text[c][1][i]})"
                            for c in ("caption", "model_0", "model_1") if text[c][1][i]), "")
                if bad:
                    batch.append(Candidate(source=f, source_row=row, bad=bad,
                                           bad_reason="bad_encoding"))
                    continue
                batch.append(Candidate(
                    source=f, source_row=row, prompt=captions[i],
                    label_0=l0[i], label_1=l1[i], has_label_1=has_l1,
                    image_0=ImageSource(images.make_ref(f, row, "jpg_0"), j0[i],
                                        missing="" if j0[i] is not None else "jpg_0 is null"),
                    image_1=ImageSource(images.make_ref(f, row, "jpg_1"), j1[i],
                                        missing="" if j1[i] is not None else "jpg_1 is null"),
                    model_0=m0[i] or "", model_1=m1[i] or ""))
            row0 += n
            yield batch
