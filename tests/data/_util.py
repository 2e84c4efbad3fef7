"""Helpers for the data tests: tiny real JPEGs, Pick-a-Pic-layout shards, ingest configs."""
from __future__ import annotations

import io
import json
import pathlib

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fifa_jax.data import ingest

PICKAPIC_TYPES = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(),
                  "label_0": pa.float64(), "label_1": pa.float64(), "model_0": pa.string(),
                  "model_1": pa.string(), "ranking_id": pa.int64()}


def jpeg(colour, size: int = 16) -> bytes:
    """A real JPEG of one solid colour."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(colour)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def colour_of(im: Image.Image) -> tuple:
    """Mean colour, rounded to the nearest 10 (JPEG is lossy)."""
    m = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return tuple(int(round(v / 10.0)) * 10 for v in m)


def write_shard(path, rows: list[dict], row_group_size: int | None = None, drop=(),
                types=None) -> str:
    """rows: dicts with Pick-a-Pic keys (missing keys -> null); `drop` removes columns."""
    types = dict(PICKAPIC_TYPES, **(types or {}))
    names = [n for n in types if n not in drop]
    cols = {n: [r.get(n) for r in rows] for n in names}
    table = pa.Table.from_pydict(cols, schema=pa.schema([(n, types[n]) for n in names]))
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def config(fmt: str, path="", **data) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ingest.default_config()
    c.data.format = fmt
    c.data.path = str(path)
    c.data.num_workers = 2
    for k, v in data.items():
        c.data[k] = v
    return c


def outputs(workdir: pathlib.Path):
    """-> (pairs as list of dicts, prompts as list of dicts, report dict)."""
    d = pathlib.Path(workdir) / "ingest"
    pairs = pq.read_table(d / "pairs.parquet").to_pylist()
    prompts = pq.read_table(d / "prompts.parquet").to_pylist()
    report = json.loads((d / "ingest_report.json").read_text())
    return pairs, prompts, report


class OpenRecorder:
    """Records the resolved path of every file opened through `open` or `os.open` (the ways
    the readers open image files) while installed with `install(monkeypatch)`."""

    def __init__(self):
        self.paths: list[str] = []

    def install(self, monkeypatch):
        import builtins
        import os
        real_open, real_os_open = builtins.open, os.open

        def rec(file):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.path.realpath(os.fsdecode(file)))

        def open_(file, *a, **k):
            rec(file)
            return real_open(file, *a, **k)

        def os_open(path, *a, **k):
            rec(path)
            return real_os_open(path, *a, **k)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        return self

    def opened(self, path) -> bool:
        import os
        return os.path.realpath(str(path)) in self.paths


class FifoWatch:
    """A FIFO that tells whether anyone opened it for reading: a thread keeps trying a
    non-blocking open for writing (which fails with ENXIO while there is no reader); when one
    succeeds, a reader had it open: `opened` is set and the write end closed at once, so the
    reader sees end-of-file instead of blocking forever. Use as a context manager."""

    def __init__(self, path):
        import os
        import threading
        self.path = str(path)
        os.mkfifo(self.path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        import errno
        import os
        import posix   # os.open itself may be wrapped by an OpenRecorder
        while not self._stop.wait(0.02):
            try:
                fd = posix.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                continue
            self.opened = True
            os.close(fd)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
