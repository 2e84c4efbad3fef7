"""Image references: make, parse, load (thread-safe, cached) and verify.

A reference is either
  - `"<parquet path>::<row>::<column>"`: the bytes in cell (row, column) of a parquet file, `row`
    counted from 0 over the whole file (all row groups); the column holds binary (or a struct
    with a `bytes` field, the Hugging Face `Image` layout), or
  - a plain file path (a `file://` prefix is accepted).

`load_image_bytes` reads parquet cells through an LRU cache of decoded *column chunks* (one row
group of one column), bounded in bytes (`set_cache_limit`, default 256 MiB). Reading refs in
file/row order, as the ingest tables list them, touches each row group once. The cache is safe
to use from many threads: a row group wanted by several threads at once is read once.
A parquet file rewritten in place (new mtime or size) is re-read, never served stale.

Image files are read with `read_image_file`: only regular files are opened (devices, FIFOs,
sockets and folders are refused from their `stat`, never opened, so none can block or stream
forever), never more than `max_bytes`, and, given a `root`, only when the path resolves (after
`..` and symbolic links) inside it. `verify_image_bytes` bounds the decoded size in pixels.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import io
import os
import stat
import threading
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SEP = "::"
DEFAULT_CACHE_BYTES = 256 << 20
DEFAULT_MAX_IMAGE_BYTES = 64 << 20     # encoded bytes of one image (file or parquet cell)
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # width x height; Pillow's own MAX_IMAGE_PIXELS default


class OutsideRootError(ValueError):
    """An image path resolves outside the folder it must stay in (nothing was opened)."""


class ImageTooLargeError(ValueError):
    """An image over the byte cap (file or cell) or the pixel cap (decoded size)."""


class NotRegularFileError(OSError):
    """The path names a device, FIFO, socket or folder (it was not opened)."""


def make_ref(path, row: int, column: str) -> str:
    """(parquet path, row, column) -> "<path>::<row>::<column>"."""
    return f"{path}{SEP}{int(row)}{SEP}{column}"


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """ref -> (path, row, column) for a parquet cell, or (path, None, None) for a file."""
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}")
    parts = ref.rsplit(SEP, 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2]:
        return parts[0], int(parts[1]), parts[2]
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    return ref, None, None


class _ChunkCache:
    """LRU of (file, row group, column) -> pyarrow binary array, bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._chunks: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._loading: dict = {}
        self._meta: dict = {}       # (path, mtime_ns, size) -> (metadata, row-group starts, names)
        self.reads = 0              # row-group column reads (for tests and diagnostics)

    def clear(self):
        with self._lock:
            self._chunks.clear()
            self._meta.clear()
            self._bytes = 0

    def _file_key(self, path: str):
        st = os.stat(path)
        return (path, st.st_mtime_ns, st.st_size)

    def _metadata(self, fkey):
        with self._lock:
            hit = self._meta.get(fkey)
        if hit is not None:
            return hit
        md = pq.read_metadata(fkey[0])
        starts = np.zeros(md.num_row_groups + 1, dtype=np.int64)
        for i in range(md.num_row_groups):
            starts[i + 1] = starts[i] + md.row_group(i).num_rows
        names = frozenset(md.schema.to_arrow_schema().names)
        with self._lock:
            self._meta[fkey] = (md, starts, names)
        return md, starts, names

    def cell(self, path: str, row: int, column: str) -> bytes:
        ref = make_ref(path, row, column)
        try:
            fkey = self._file_key(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{ref}: parquet file not found") from None
        md, starts, names = self._metadata(fkey)
        if not 0 <= row < starts[-1]:
            raise IndexError(f"{ref}: row out of range (file has {int(starts[-1])} rows)")
        if column not in names:
            raise KeyError(f"{ref}: no column '{column}' in {path}")
        rg = int(np.searchsorted(starts, row, side="right") - 1)
        arr = self._chunk(fkey, md, rg, column)
        value = arr[row - int(starts[rg])].as_py()
        if value is None:
            raise ValueError(f"{ref}: cell is null (no image bytes)")
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"{ref}: cell holds {type(value).__name__}, not image bytes")
        return value

    def _chunk(self, fkey, md, rg: int, column: str):
        key = (fkey, rg, column)
        with self._lock:
            arr = self._chunks.get(key)
            if arr is not None:
                self._chunks.move_to_end(key)
                return arr
            fut = self._loading.get(key)
            owner = fut is None
            if owner:
                fut = concurrent.futures.Future()
                self._loading[key] = fut
        if not owner:
            return fut.result()
        try:
            table = pq.ParquetFile(fkey[0], metadata=md).read_row_group(rg, columns=[column])
            arr = table.column(0).combine_chunks()
            if pa.types.is_struct(arr.type):  # Hugging Face Image feature: {bytes, path}
                arr = arr.field("bytes")
            with self._lock:
                self.reads += 1
                self._chunks[key] = arr
                self._bytes += arr.nbytes
                while self._bytes > self.max_bytes and len(self._chunks) > 1:
                    _, old = self._chunks.popitem(last=False)
                    self._bytes -= old.nbytes
                self._loading.pop(key, None)
            fut.set_result(arr)
            return arr
        except BaseException as e:
            with self._lock:
                self._loading.pop(key, None)
            fut.set_exception(e)
            raise


_CACHE = _ChunkCache(DEFAULT_CACHE_BYTES)


def set_cache_limit(max_bytes: int) -> None:
    """Bound the parquet chunk cache (bytes); the newest chunk is always kept."""
    _CACHE.max_bytes = int(max_bytes)


def clear_cache() -> None:
    _CACHE.clear()


def cache_reads() -> int:
    """How many (row group, column) chunks have been read from parquet so far."""
    return _CACHE.reads


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def is_inside(path: str, root: str) -> bool:
    """Whether `path` resolves (after `..` and symbolic links) to `root` or below it."""
    real, base = os.path.realpath(path), _real_root(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _require_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
        raise NotRegularFileError(f"{path}: {kind}, not an image file (not opened)")


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_image_file(path: str, *, root: str | None = None, max_bytes: int | None = None,
                    read: bool = True) -> bytes | None:
    """The bytes of the image file at `path` (None when `read` is False: checks only).

    root: when set, `path` must resolve inside it, else OutsideRootError (nothing is opened,
          only the path is resolved).
    Raises FileNotFoundError (absent), NotRegularFileError (device, FIFO, socket, folder: refused
    from `stat`, never opened), ImageTooLargeError (over `max_bytes`; at most max_bytes + 1 bytes
    are ever read, whatever the file claims), OSError (unreadable). The file is opened
    non-blocking and checked again once open, so a path swapped for a FIFO after the check
    still cannot block; with `root`, the resolved path is opened without following a final
    symbolic link, so one swapped in after the check cannot escape the root either.
    """
    if root is not None:
        if not is_inside(path, root):
            raise OutsideRootError(f"{path}: outside the image root {root} (not read; set "
                                   "data.allow_outside_root=True to allow)")
        path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    _require_regular(path, st.st_mode)
    if max_bytes is not None and st.st_size > max_bytes:
        raise ImageTooLargeError(f"{path}: {st.st_size} bytes, over the cap of {max_bytes} "
                                 "(data.max_image_bytes)")
    if not read:
        return None
    fd = os.open(path, _OPEN_FLAGS | (_NOFOLLOW if root is not None else 0))
    with os.fdopen(fd, "rb") as f:
        _require_regular(path, os.fstat(fd).st_mode)
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"{path}: over the cap of {max_bytes} bytes "
                                 "(data.max_image_bytes)")
    return data


def load_image_bytes(ref: str) -> bytes:
    """The encoded image bytes behind `ref` (parquet cell or regular file). Thread-safe."""
    path, row, column = parse_ref(ref)
    if row is None:
        try:
            return read_image_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{ref}: image file not found") from None
    return _CACHE.cell(path, row, column)


def decode_image(data: bytes, ref: str = "<bytes>") -> Image.Image:
    """Encoded bytes -> fully loaded RGB PIL image; errors name `ref`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        raise ValueError(f"{ref}: cannot decode image: {e}") from e


def load_image(ref: str) -> Image.Image:
    """`ref` -> RGB PIL image (loaded, detached from any file). Thread-safe."""
    return decode_image(load_image_bytes(ref), ref)


CHECK_MODES = ("decode", "header", "none")


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """Set Pillow's decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, process-wide) to
    `max_pixels` inside the block, its warning silenced there (verify_image_bytes applies the
    exact cap itself); restored on exit. Pillow refuses more than twice the limit in
    `Image.open` already, before decoding anything."""
    old = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def verify_image_bytes(data: bytes, mode: str = "decode", max_pixels: int | None = None) -> None:
    """Raise if `data` is not a usable image; cost depends on `mode`.

    max_pixels: width x height above this raises ImageTooLargeError before decoding (so does
    Pillow's own guard, DecompressionBombError turned into ImageTooLargeError; its limit is
    set by `pixel_limit`).

    decode: decode every byte of the compressed stream. JPEGs are decoded in draft mode (DCT
            scaling to 1/8 size: all entropy-coded data is still read, so truncated streams
            fail; ~0.6x the cost of a full decode on a 768x768 photo-like JPEG, 5 ms on one
            core); other formats fully. Run it in a thread pool: Pillow decodes without the GIL.
    header: `Image.open` + `verify()`: reads the header (and checks PNG chunk CRCs), ~free, but
            a JPEG truncated after its header passes.
    none:   only the presence of bytes is checked (by the caller).
    """
    if mode == "none":
        return
    if mode not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, got {mode!r}")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{e} (data.max_image_pixels)") from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels, over the cap of {max_pixels} "
                                     "(data.max_image_pixels)")
        if mode == "header":
            im.verify()
            return
        if w <= 0 or h <= 0:
            raise ValueError(f"image has empty size {im.size}")
        if im.format == "JPEG":
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        im.load()
