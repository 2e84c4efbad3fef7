"""Candidate rows from any reader -> validated, winner-first pairs, with every skip counted.

Readers (pickapic, hpdv2, jsonl_csv) yield batches of `Candidate`s; `PairBuilder.add_batch`
applies the rules below in this order, and each skipped row is counted under the first rule it
fails (the counts and a few examples per reason end up in ingest_report.json):

 1. reader-level failure (unparsable record, CSV quoting error) -> skipped "bad_record"
    (a JSONL line / CSV record / parquet text cell not UTF-8    -> skipped "bad_encoding")
 2. prompt null / empty after removing whitespace and control or format characters (NUL,
    ESC, zero-width space, ...)                                 -> skipped "empty_prompt"
 3. label_0 not in {0, 0.5, 1}, or label_0 + label_1 != 1      -> skipped "bad_label"
 4. tie (label_0 == 0.5): dropped (counted "ties_dropped") unless keep_ties; kept ties have
    is_tie=True and keep their order
 5. either image file resolving (after `..` and symbolic links) outside its image root, unless
    allowed: never opened                                       -> skipped "outside_root"
    either image missing (null bytes, absent file, remote URL, a path naming a device, FIFO,
    socket or folder: never opened)                             -> skipped "missing_image"
    either image over max_image_bytes (a file's size, from stat, before reading; a cell's
    length) or over max_image_pixels (width x height, before decoding) -> "image_too_large"
    either image not decodable (see images.verify_image_bytes)  -> skipped "undecodable_image"
    (one reason per row, in this order of precedence)
 6. same image on both sides (identical bytes, or the same file path; with
    check_images="none" files are compared by path only): such a pair carries no preference
    -> skipped "same_image" unless keep_same_image; every such pair seen is also counted in
    "same_image_pairs" (kept ones too).
 7. duplicate: same stripped prompt and the same two images (unordered) as an earlier kept
    pair -> skipped "duplicate", the first one is kept; a duplicate whose outcome (winner or
    tie) differs from the kept one is also counted in "duplicates_conflicting".
    Image identity: blake2b-128 of the bytes for parquet cells, the absolute path for files.
    The seen-set holds a 64-bit hash per kept pair (~100 B each; a false match has odds ~1e-8
    at 1M pairs).
 8. winner first: label_0 == 0 swaps the images (counted "swapped").

Unique prompts: the exact text after stripping surrounding whitespace (case and inner
whitespace kept); prompt ids are given in order of first kept appearance.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import unicodedata

import pyarrow as pa

from fifa_jax.data import images, schema


@dataclasses.dataclass
class ImageSource:
    """One image of a candidate row.

    ref: the reference written to pairs.parquet (see images.py).
    data: bytes in hand (parquet cell); None for files (read when checked) or null cells.
    is_file: the image is the file at `ref`.
    missing: non-empty = why there is no image at all (null cell, remote URL, empty path).
    root: files only: the folder the file must resolve inside (None = anywhere).
    """
    ref: str
    data: bytes | None = None
    is_file: bool = False
    missing: str = ""
    root: str | None = None


@dataclasses.dataclass
class Candidate:
    source: str                 # file the row came from
    source_row: int             # row / record / line index in that file (0-based)
    prompt: object = None
    label_0: object = None
    label_1: object = None
    has_label_1: bool = False
    image_0: ImageSource | None = None
    image_1: ImageSource | None = None
    model_0: str = ""
    model_1: str = ""
    bad: str = ""               # non-empty: the reader could not parse this record
    bad_reason: str = "bad_record"  # the skip reason used when `bad` is set


# image statuses that skip a row, by precedence (the first one found names the skip)
_IMAGE_SKIPS = ("outside_root", "missing_image", "image_too_large", "undecodable_image")


def _inspect(src: ImageSource, mode: str, max_bytes: int, max_pixels: int
             ) -> tuple[str, str, bytes | str | None, bytes | None]:
    """-> (status, message, identity, content digest or None when the bytes were not read);
    status "ok" or one of _IMAGE_SKIPS."""
    if src.missing:
        return "missing_image", src.missing, None, None
    if src.is_file:
        try:
            data = images.read_image_file(src.ref, root=src.root, max_bytes=max_bytes,
                                          read=mode != "none")
        except images.OutsideRootError as e:
            return "outside_root", str(e), None, None
        except images.ImageTooLargeError as e:
            return "image_too_large", str(e), None, None
        except FileNotFoundError:
            return "missing_image", f"file not found: {src.ref}", None, None
        except OSError as e:  # includes NotRegularFileError (device, FIFO, socket, folder)
            return "missing_image", (str(e) if isinstance(e, images.NotRegularFileError)
                                     else f"cannot read {src.ref}: {e.strerror or e}"), None, None
        except ValueError as e:   # a NUL byte or an unencodable character in the path
            return "missing_image", f"invalid image path {src.ref!r}: {e}", None, None
        if data is None:   # mode "none": the checks above only
            return "ok", "", src.ref, None
        identity = src.ref
    else:
        data = src.data
        if data is None:
            return "missing_image", f"{src.ref}: null image bytes", None, None
        identity = None
        if len(data) > max_bytes:
            return "image_too_large", (f"{src.ref}: {len(data)} bytes, over the cap of "
                                       f"{max_bytes} (data.max_image_bytes)"), None, None
    if len(data) == 0:
        return "missing_image", f"{src.ref}: 0 bytes", None, None
    try:
        images.verify_image_bytes(data, mode, max_pixels=max_pixels)
    except images.ImageTooLargeError as e:
        return "image_too_large", f"{src.ref}: {e}", None, None
    except Exception as e:  # PIL raises many exception types for bad data
        return "undecodable_image", f"{src.ref}: {type(e).__name__}: {e}", None, None
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return "ok", "", identity if identity is not None else digest, digest


class PairBuilder:
    """Stateful filter: add_batch(candidates) -> pyarrow table of new pairs (PAIRS_SCHEMA)."""

    def __init__(self, *, keep_ties: bool = False, keep_same_image: bool = False,
                 check_images: str = "decode", executor=None, max_examples: int = 5,
                 max_image_bytes: int = images.DEFAULT_MAX_IMAGE_BYTES,
                 max_image_pixels: int = images.DEFAULT_MAX_IMAGE_PIXELS):
        if check_images not in images.CHECK_MODES:
            raise ValueError(f"config.data.check_images must be one of {images.CHECK_MODES}, "
                             f"got {check_images!r}")
        for key, value in (("max_image_bytes", max_image_bytes),
                           ("max_image_pixels", max_image_pixels)):
            if not value >= 1:
                raise ValueError(f"config.data.{key} must be >= 1, got {value!r}")
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.keep_ties = bool(keep_ties)
        self.keep_same_image = bool(keep_same_image)
        self.check_images = check_images
        self.executor = executor
        self.max_examples = max_examples
        self.rows_read = 0
        self.pairs_kept = 0
        self.ties_seen = 0
        self.ties_dropped = 0
        self.ties_kept = 0
        self.swapped = 0
        self.duplicates_conflicting = 0
        self.same_image_pairs = 0
        self.skipped = collections.Counter({r: 0 for r in schema.SKIP_REASONS})
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.prompt_ids: dict[str, int] = {}
        self.prompt_counts: list[int] = []
        self._seen: dict[int, int] = {}
        self.per_source: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter)

    # -- bookkeeping -------------------------------------------------------------------------
    def _skip(self, cand: Candidate, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.per_source[cand.source]["skipped"] += 1
        ex = self.examples[reason]
        if len(ex) < self.max_examples:
            ex.append(f"{cand.source} row {cand.source_row}: {message}")

    def _inspect_all(self, sources: list[ImageSource]) -> dict[str, tuple]:
        unique = list({s.ref: s for s in sources}.values())
        args = (self.check_images, self.max_image_bytes, self.max_image_pixels)
        if self.executor is None or len(unique) < 2:
            results = [_inspect(s, *args) for s in unique]
        else:
            results = list(self.executor.map(lambda s: _inspect(s, *args), unique))
        return {s.ref: r for s, r in zip(unique, results)}

    # -- the rules ---------------------------------------------------------------------------
    def add_batch(self, cands: list[Candidate]) -> pa.Table:
        survivors = []
        for c in cands:
            self.rows_read += 1
            self.per_source[c.source]["rows"] += 1
            if c.bad:
                self._skip(c, c.bad_reason, c.bad)
                continue
            text = c.prompt.strip() if isinstance(c.prompt, str) else ""
            if not is_visible(text):
                self._skip(c, "empty_prompt", f"prompt {c.prompt!r} is empty")
                continue
            label, why = schema.check_labels(c.label_0, c.label_1, c.has_label_1)
            if label is None:
                self._skip(c, "bad_label", why)
                continue
            if label == 0.5:
                self.ties_seen += 1
                if not self.keep_ties:
                    self.ties_dropped += 1
                    self.per_source[c.source]["ties_dropped"] += 1
                    continue
            survivors.append((c, text, label))

        checked = self._inspect_all([img for c, _, _ in survivors
                                     for img in (c.image_0, c.image_1)])
        cols = {name: [] for name in schema.PAIRS_SCHEMA.names}
        for c, text, label in survivors:
            (s0, m0, id0, d0), (s1, m1, id1, d1) = (checked[c.image_0.ref],
                                                    checked[c.image_1.ref])
            if s0 != "ok" or s1 != "ok":
                bad = [(s, m) for s, m in ((s0, m0), (s1, m1)) if s != "ok"]
                reason, msg = min(bad, key=lambda x: _IMAGE_SKIPS.index(x[0]))
                self._skip(c, reason, msg)
                continue
            if id0 == id1 or (d0 is not None and d0 == d1):
                self.same_image_pairs += 1
                if not self.keep_same_image:
                    self._skip(c, "same_image", f"both sides are the same image ({c.image_0.ref}"
                               + ("" if c.image_0.ref == c.image_1.ref
                                  else f" and {c.image_1.ref}") + ")")
                    continue
            a, b = (id0, id1) if _key(id0) <= _key(id1) else (id1, id0)
            h = hashlib.blake2b(text.encode("utf-8"), digest_size=8)
            h.update(b"\x00" + _key(a) + b"\x00" + _key(b))
            key = int.from_bytes(h.digest(), "little")
            outcome = 0 if label == 0.5 else (1 if (id0 if label == 1.0 else id1) == a else 2)
            prev = self._seen.get(key)
            if prev is not None:
                if prev != outcome:
                    self.duplicates_conflicting += 1
                self._skip(c, "duplicate", "same prompt and images as an earlier pair"
                           + (" (different outcome)" if prev != outcome else ""))
                continue
            self._seen[key] = outcome

            is_tie = label == 0.5
            if is_tie:
                self.ties_kept += 1
            win, lose, wm, lm = c.image_0, c.image_1, c.model_0, c.model_1
            if label == 0.0:
                win, lose, wm, lm = lose, win, lm, wm
                self.swapped += 1
            pid = self.prompt_ids.get(text)
            if pid is None:
                pid = self.prompt_ids[text] = len(self.prompt_counts)
                self.prompt_counts.append(0)
            self.prompt_counts[pid] += 1
            cols["pair_id"].append(self.pairs_kept)
            cols["prompt_id"].append(pid)
            cols["winner_ref"].append(win.ref)
            cols["loser_ref"].append(lose.ref)
            cols["source"].append(c.source)
            cols["source_row"].append(int(c.source_row))
            cols["label_0"].append(label)
            cols["is_tie"].append(is_tie)
            cols["winner_model"].append(wm or "")
            cols["loser_model"].append(lm or "")
            self.pairs_kept += 1
            self.per_source[c.source]["kept"] += 1
        return pa.Table.from_pydict(cols, schema=schema.PAIRS_SCHEMA)

    # -- outputs -----------------------------------------------------------------------------
    def prompts_table(self) -> pa.Table:
        texts = list(self.prompt_ids)  # insertion order == prompt id order
        return pa.Table.from_pydict(
            {"prompt_id": list(range(len(texts))), "text": texts,
             "n_pairs": self.prompt_counts}, schema=schema.PROMPTS_SCHEMA)

    def report(self) -> dict:
        skipped_total = int(sum(self.skipped.values()))
        return {
            "rows_read": self.rows_read,
            "pairs_kept": self.pairs_kept,
            "unique_prompts": len(self.prompt_counts),
            "skipped": dict(self.skipped),
            "skipped_total": skipped_total,
            "ties_seen": self.ties_seen,
            "ties_dropped": self.ties_dropped,
            "ties_kept": self.ties_kept,
            "swapped": self.swapped,
            "duplicates_conflicting": self.duplicates_conflicting,
            "same_image_pairs": self.same_image_pairs,
            "accounted": self.rows_read == self.pairs_kept + self.ties_dropped + skipped_total,
            "skip_examples": {k: list(v) for k, v in self.examples.items() if v},
            "per_source": {k: dict(v) for k, v in self.per_source.items()},
        }


def _key(identity) -> bytes:
    return identity if isinstance(identity, bytes) else identity.encode("utf-8")


_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Zs", "Zl", "Zp"))


def is_visible(text: str) -> bool:
    """Whether `text` holds a character other than whitespace and control / format characters
    (Unicode categories Cc, Cf, Cs: NUL, ESC, zero-width space, BOM, lone surrogates)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in _INVISIBLE for ch in text)


def image_root_for(path: str, image_root: str) -> str:
    """Base folder of relative image paths: `image_root` if given, else the file's folder."""
    return os.path.abspath(os.path.expanduser(image_root)) if image_root else os.path.dirname(path)


def batched(candidates, batch_rows: int):
    """Lists of up to `batch_rows` candidates from an iterable of them."""
    batch = []
    for cand in candidates:
        batch.append(cand)
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def file_image(value, root: str, allow_outside_root: bool = False) -> ImageSource:
    """An image path from an annotation (relative to `root`, or absolute, or file:// URL).
    The file must resolve inside `root` (checked when read) unless `allow_outside_root`."""
    if not isinstance(value, str) or not value.strip():
        return ImageSource(ref=f"<empty path in {root}>:{value!r}", is_file=True,
                           missing=f"image path {value!r} is empty")
    value = value.strip()
    if value.startswith(("http://", "https://", "s3://", "gs://")):
        return ImageSource(ref=value, is_file=True,
                           missing=f"remote image {value} is not fetched; download it first")
    if value.startswith("file://"):
        value = value[len("file://"):]
    path = os.path.abspath(os.path.join(root, os.path.expanduser(value)))
    return ImageSource(ref=path, is_file=True, root=None if allow_outside_root else root)
