"""The ingest stage: preference data in a published layout -> pairs and prompts tables.

Inputs (config.data, see `default_config`): `format` pickapic | hpdv2 | jsonl | csv | demo and
`path` (pickapic: shard folder, glob, file or comma list; hpdv2: annotation JSON(s); jsonl/csv:
file(s)); demo ignores `path` and first writes the demo world into workdir/ingest/demo_data/
(skipped when it is already there with the same parameters), then reads its shards with the
Pick-a-Pic reader.

Outputs (workdir/ingest/):
  pairs.parquet        pair_id, prompt_id, winner_ref, loser_ref, source, source_row, label_0,
                       is_tie, winner_model, loser_model (schema.PAIRS_SCHEMA)
  prompts.parquet      prompt_id, text, n_pairs (schema.PROMPTS_SCHEMA)
  ingest_report.json   counts: rows read, pairs kept, skipped by reason (+ examples), ties,
                       swaps, duplicates, same-image pairs, per source file; and the settings
                       used
The rules (ties, winner first, skips, duplicates, unique prompts) are in rows.py. Outputs are
written to temporary names and renamed at the end, so a rerun after a crash starts clean.
A run that keeps no pair at all writes its report and then raises IngestError.
Images are checked in a thread pool (`num_workers`, 0 = all cores) per `check_images`. Image
files (hpdv2/jsonl/csv) must resolve inside the image root (`allow_outside_root` lifts this)
and be regular files; no image over `max_image_bytes` is read, none over `max_image_pixels`
decoded (skips "outside_root", "missing_image", "image_too_large"; see rows.py).
`input_signature` (sizes and modification times of the data files) is part of the stage's
fingerprint: changed shards rerun ingest. Image files named by path (hpdv2/jsonl/csv) are not
stat'ed (hundreds of thousands of files, often on network storage): after replacing images in
place, rerun with `--force=ingest,score`.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import time

import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from tqdm import tqdm

from fifa_jax.data import hpdv2, images, jsonl_csv, pickapic, schema
from fifa_jax.demo import assets
from fifa_jax.files import file_stats
from fifa_jax.data.rows import PairBuilder

FORMATS = ("pickapic", "hpdv2", "jsonl", "csv", "demo")
STAGE = "ingest"
SECTION = "data"
CONFIG_KEYS = ("data",)         # not config.seed: a new seed must not redo hours of decoding
UPSTREAM = ()
ALL_HOSTS = False               # host-side work: process 0 alone runs it
SPEED_ONLY = ("num_workers", "batch_rows")
RULES = {"format": ("choice", FORMATS),
         "check_images": ("choice", ("decode", "header", "none")),
         "num_workers": ("min", 0), "batch_rows": ("min", 1), "max_rows": ("min", 0),
         "max_image_bytes": ("min", 1), "max_image_pixels": ("min", 1)}
DEMO_DIR = "demo_data"
_WRITE_ROWS = 65536


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.format = "demo"            # pickapic | hpdv2 | jsonl | csv | demo
    c.path = ""                  # data location (unused by demo)
    c.image_root = ""            # hpdv2/jsonl/csv: base of relative image paths ("" = file's dir)
    c.allow_outside_root = False  # hpdv2/jsonl/csv: read image paths resolving (after .. and
    #                               symlinks; absolute ones too) outside image_root; else
    #                               such rows are skipped as outside_root, the file never opened
    c.max_image_bytes = images.DEFAULT_MAX_IMAGE_BYTES   # larger image files / cells: skipped
    #                               as image_too_large, the file never read (64 MiB)
    c.max_image_pixels = images.DEFAULT_MAX_IMAGE_PIXELS  # width x height above this:
    #                               image_too_large, not decoded (Pillow's bomb guard, ~89.5 M)
    c.keep_ties = False          # keep label_0 == 0.5 pairs (is_tie=True, order unchanged)
    c.keep_same_image = False    # keep pairs whose two sides are the same image (no preference)
    c.max_rows = 0               # stop after this many candidate rows (0 = all)
    c.check_images = "decode"    # decode | header | none (see images.verify_image_bytes)
    c.num_workers = 0            # image-check threads (0 = os.cpu_count())
    c.batch_rows = 256           # rows per read batch (bounds the image bytes held in RAM)
    c.demo = assets.world_config()
    return c


def input_signature(config, workdir=None) -> dict:
    """{file: [size, mtime_ns]} of the data files `config.data` reads (not the image files they
    name by path); the runner folds it into this stage's fingerprint, so new, removed or
    rewritten shards rerun ingest (and everything after it) although the config is unchanged.
    A path that no longer resolves is recorded as such (the rerun then fails naming it)."""
    data = config.get("data") or {}
    fmt = data.get("format", "demo")
    if fmt not in FORMATS or fmt == "demo":   # demo: made from the config; bad: run() says so
        return {}
    suffix = {"pickapic": ".parquet", "hpdv2": ".json"}.get(fmt, "." + fmt)
    try:
        files = pickapic.resolve_files(data.get("path", ""), suffix=suffix)
    except schema.IngestError as e:
        return {"unresolved": str(e)}
    out = {}
    for f in files:
        out.update(file_stats(f))
    return out


def _world_params(demo, out_dir: pathlib.Path) -> dict:
    """`write_world`'s arguments from the data.demo section; generators="base" adds the demo
    base (installed in the work directory) and the sampler that draws its images."""
    params = demo.to_dict()
    if params.get("generators", "scenes") == "base":
        from fifa_jax.demo import base_generators
        params["base_folder"] = assets.resolve_base_model(assets.DEMO, out_dir.parent)
        params["sample_pools"] = base_generators.sample_pools
    return params


def _open_source(data, out_dir: pathlib.Path):
    """-> (format used by the reader, files, total rows or None, batch iterator factory)."""
    fmt = data.format
    if fmt not in FORMATS:
        raise schema.IngestError("config.data.format", f"{fmt!r} is not one of {FORMATS}")
    batch_rows = int(data.batch_rows)
    if batch_rows < 1:
        raise schema.IngestError("config.data.batch_rows", f"must be >= 1, got {batch_rows}")
    for key in ("max_image_bytes", "max_image_pixels"):
        if not data[key] >= 1:
            raise schema.IngestError(f"config.data.{key}", f"must be >= 1, got {data[key]!r}")
    outside = bool(data.allow_outside_root)
    if fmt in ("pickapic", "demo"):
        if fmt == "demo":
            info = assets.write_world(out_dir / DEMO_DIR, **_world_params(data.demo, out_dir))
            logging.info("demo world %s in %s", "reused" if info["reused"] else "written",
                         info["out_dir"])
            files = assets.shard_files(out_dir / DEMO_DIR)
        else:
            files = pickapic.resolve_files(data.path)
        pickapic.check_schemas(files)
        return files, pickapic.total_rows(files), lambda: pickapic.iter_batches(files, batch_rows)
    if fmt == "hpdv2":
        files = pickapic.resolve_files(data.path, suffix=".json")
        recs = {f: hpdv2.load_records(f) for f in files}
        total = sum(hpdv2.count_candidates(r) for r in recs.values())

        def gen():
            for f in files:
                yield from hpdv2.iter_batches(f, image_root=data.image_root,
                                              batch_rows=batch_rows, records=recs.pop(f),
                                              allow_outside_root=outside)
        return files, total, gen
    reader = jsonl_csv.iter_jsonl if fmt == "jsonl" else jsonl_csv.iter_csv
    files = pickapic.resolve_files(data.path, suffix="." + fmt)
    total = sum(jsonl_csv.count_lines(f) for f in files) - (len(files) if fmt == "csv" else 0)

    def gen():
        for f in files:
            yield from reader(f, image_root=data.image_root, batch_rows=batch_rows,
                              allow_outside_root=outside)
    return files, max(total, 0), gen


def _build_pairs(data, batches, tmp_pairs, total, max_rows: int, workers: int) -> PairBuilder:
    """Stream every batch through a PairBuilder, writing the kept pairs to `tmp_pairs`."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, \
            pq.ParquetWriter(tmp_pairs, schema.PAIRS_SCHEMA) as writer, \
            images.pixel_limit(int(data.max_image_pixels)), \
            tqdm(total=total, unit="row", desc="ingest", mininterval=2.0) as bar:
        builder = PairBuilder(keep_ties=data.keep_ties, keep_same_image=data.keep_same_image,
                              check_images=data.check_images,
                              executor=pool if workers > 1 else None,
                              max_image_bytes=int(data.max_image_bytes),
                              max_image_pixels=int(data.max_image_pixels))
        pending: list[pa.Table] = []
        n_pending = 0
        for batch in batches():
            if max_rows:
                batch = batch[: max_rows - builder.rows_read]
            pending.append(builder.add_batch(batch))
            n_pending += pending[-1].num_rows
            bar.update(len(batch))
            bar.set_postfix(kept=builder.pairs_kept, refresh=False)
            if n_pending >= _WRITE_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending, n_pending = [], 0
            if max_rows and builder.rows_read >= max_rows:
                break
        if pending:
            writer.write_table(pa.concat_tables(pending))
    return builder


def run(config, workdir) -> dict:
    """Ingest config.data into workdir/ingest/; -> summary counts (see module doc)."""
    data = config.data
    workdir = pathlib.Path(workdir)
    out_dir = workdir / STAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    files, total, batches = _open_source(data, out_dir)
    max_rows = int(data.max_rows)
    if max_rows < 0:
        raise schema.IngestError("config.data.max_rows", f"must be >= 0, got {max_rows}")
    if max_rows and total is not None:
        total = min(total, max_rows)
    workers = int(data.num_workers) or (os.cpu_count() or 1)
    logging.info("ingest: %s, %d file(s), about %s rows, check_images=%s, %d thread(s)",
                 data.format, len(files), total, data.check_images, workers)

    pairs_path, prompts_path = out_dir / "pairs.parquet", out_dir / "prompts.parquet"
    report_path = out_dir / "ingest_report.json"
    for p in (pairs_path, prompts_path, report_path):
        p.unlink(missing_ok=True)   # never leave old outputs beside new ones
    tmp_pairs = out_dir / "pairs.parquet.tmp"
    try:
        builder = _build_pairs(data, batches, tmp_pairs, total, max_rows, workers)
    except BaseException:
        tmp_pairs.unlink(missing_ok=True)   # e.g. a corrupt shard: leave no partial table
        raise

    prompts = builder.prompts_table()
    tmp_prompts = out_dir / "prompts.parquet.tmp"
    pq.write_table(prompts, tmp_prompts)
    report = builder.report()
    report.update(
        format=data.format, sources=files, keep_ties=bool(data.keep_ties),
        keep_same_image=bool(data.keep_same_image),
        check_images=data.check_images, max_rows=max_rows,
        allow_outside_root=bool(data.allow_outside_root),
        max_image_bytes=int(data.max_image_bytes), max_image_pixels=int(data.max_image_pixels),
        stopped_at_max_rows=bool(max_rows) and builder.rows_read >= max_rows,
        seconds=round(time.time() - t0, 3))
    tmp_report = out_dir / "ingest_report.json.tmp"
    tmp_report.write_text(json.dumps(report, indent=2, sort_keys=True))
    os.replace(tmp_pairs, pairs_path)
    os.replace(tmp_prompts, prompts_path)
    os.replace(tmp_report, report_path)
    summary = {k: report[k] for k in ("rows_read", "pairs_kept", "unique_prompts",
                                      "skipped_total", "ties_dropped", "ties_kept", "swapped")}
    summary.update({f"skipped_{k}": v for k, v in report["skipped"].items()})
    logging.info("ingest: %s", summary)
    if report["pairs_kept"] == 0:
        raise schema.IngestError(report_path, f"no pair kept out of {report['rows_read']} "
                                 f"row(s); skipped: {report['skipped']}, ties dropped: "
                                 f"{report['ties_dropped']}")
    if report["skipped_total"]:
        logging.warning("ingest skipped %d row(s): %s (examples in %s)", report["skipped_total"],
                        {k: v for k, v in report["skipped"].items() if v}, report_path)
    return summary
