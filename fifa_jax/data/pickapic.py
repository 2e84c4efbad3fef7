"""Pick-a-Pic v2 reader: parquet shards as published -> batches of `rows.Candidate`.

`path` is a folder (its `*.parquet`, sorted, not recursive), a glob (`data/train-*.parquet`),
one file, or a comma-separated list of any of these. Every shard's schema is checked before the
first row is read, so a missing or mistyped column fails at once, naming file and column.

Streaming: shards are read one at a time in `batch_rows` row batches (pyarrow iter_batches over
the needed columns only); a batch's image bytes are dropped once checked. Image references are
`"<absolute shard path>::<row in shard>::jpg_0|jpg_1"`; `source_row` is that row.
Columns: caption, jpg_0, jpg_1, label_0 required; label_1, model_0, model_1 used when present;
the ids (ranking_id, image_*_uid, ...) are not needed and not read.
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
        else:
            raise schema.IngestError(part, "no such file or folder")
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
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_number(t):
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


_TYPES = {"caption": (_is_text, "string"), "jpg_0": (_is_image_type, "binary"),
          "jpg_1": (_is_image_type, "binary"), "label_0": (_is_number, "a number"),
          "label_1": (_is_number, "a number"), "model_0": (_is_text, "string"),
          "model_1": (_is_text, "string")}


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
            ok, want = _TYPES[c]
            if not ok(arrow_schema.field(c).type):
                raise schema.IngestError(
                    f, f"has type {arrow_schema.field(c).type}, expected {want}", column=c)
        out[f] = cols
    return out


def total_rows(files: list[str]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


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
            captions = d["caption"].to_pylist()
            l0 = d["label_0"].to_pylist()
            l1 = d["label_1"].to_pylist() if has_l1 else [None] * n
            m0 = d["model_0"].to_pylist() if "model_0" in d else [""] * n
            m1 = d["model_1"].to_pylist() if "model_1" in d else [""] * n
            j0, j1 = _binary_list(d["jpg_0"]), _binary_list(d["jpg_1"])
            batch = []
            for i in range(n):
                row = row0 + i
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
