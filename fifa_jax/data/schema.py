"""Column contracts of the input formats and of the ingest outputs, and the ingest error type.

Input formats (required columns must exist, else `IngestError` naming file and column; optional
columns are used when present):

| format   | required                                   | optional                        |
|----------|--------------------------------------------|---------------------------------|
| pickapic | caption, jpg_0, jpg_1, label_0             | label_1, model_0, model_1 (ids) |
| hpdv2    | prompt, image list (image_path | file_path),| raw_annotations (ignored)       |
|          | preference list (rank | human_preference)  |                                 |
| jsonl    | prompt, image_0, image_1, label_0          | label_1, model_0, model_1       |
| csv      | prompt, image_0, image_1, label_0          | label_1, model_0, model_1       |

Outputs (the work-directory contract, `workdir/ingest/`): `PAIRS_SCHEMA`, `PROMPTS_SCHEMA`.
"""
from __future__ import annotations

import math

import pyarrow as pa

from fifa_jax.errors import InputError

PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
PICKAPIC_OPTIONAL = ("label_1", "model_0", "model_1")
HPDV2_IMAGE_KEYS = ("image_path", "file_path")          # test.json | train.json
HPDV2_PREFERENCE_KEYS = ("rank", "human_preference")     # lower rank wins | 1 marks the winner
USER_REQUIRED = ("prompt", "image_0", "image_1", "label_0")
USER_OPTIONAL = ("label_1", "model_0", "model_1")

# Why a candidate row was skipped (keys of ingest_report.json["skipped"]).
SKIP_REASONS = (
    "empty_prompt",       # caption null, empty, or only whitespace / control characters
    "bad_label",          # label_0 not in {0, 0.5, 1}, or label_0 + label_1 != 1
    "missing_image",      # image bytes null / file absent / remote URL / not a regular file
    "undecodable_image",  # bytes present but PIL cannot decode them
    "same_image",         # winner and loser are the same image (skipped unless keep_same_image)
    "duplicate",          # same prompt and same two images as an earlier kept pair
    "bad_record",         # a record the reader could not parse at all (bad JSON line, CSV
                          # quoting error, ...)
    "bad_encoding",       # a JSONL line / CSV record / parquet text cell that is not UTF-8
    "outside_root",       # an image path resolving outside the image root (never opened)
    "image_too_large",    # over data.max_image_bytes or data.max_image_pixels
)

VALID_LABELS = (0.0, 0.5, 1.0)

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.int64()),
    ("prompt_id", pa.int64()),
    ("winner_ref", pa.string()),
    ("loser_ref", pa.string()),
    ("source", pa.string()),
    ("source_row", pa.int64()),
    ("label_0", pa.float64()),
    ("is_tie", pa.bool_()),
    ("winner_model", pa.string()),
    ("loser_model", pa.string()),
])

PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.int64()),
    ("text", pa.string()),
    ("n_pairs", pa.int64()),
])


class IngestError(InputError):
    """Input that cannot be ingested at all (missing file or column, wrong column type).

    The message names the file and the column or key, and what was expected.
    """

    def __init__(self, file, message: str, column: str | None = None):
        self.file = str(file)
        self.column = column
        where = f"{self.file}" + (f": column '{column}'" if column else "")
        super().__init__(f"{where}: {message}")


def missing_columns(present, required) -> list[str]:
    """Required names absent from `present`, in the order of `required`."""
    have = set(present)
    return [c for c in required if c not in have]


def require_columns(file, present, required) -> None:
    """Raise `IngestError` naming the first missing required column (and listing all)."""
    missing = missing_columns(present, required)
    if missing:
        raise IngestError(
            file, f"required column missing (missing: {missing}; present: {sorted(present)})",
            column=missing[0])


def parse_label(value) -> float | None:
    """A label value -> float in {0, 0.5, 1}, or None when absent, unparsable or outside."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: a 400-digit integer
        return None
    if math.isnan(x) or x not in VALID_LABELS:
        return None
    return x


def check_labels(label_0, label_1, has_label_1: bool) -> tuple[float | None, str]:
    """Validate (label_0[, label_1]) -> (label_0 as float or None, reason text if bad)."""
    l0 = parse_label(label_0)
    if l0 is None:
        return None, f"label_0={label_0!r} not in {{0, 0.5, 1}}"
    if has_label_1 and label_1 is not None:
        l1 = parse_label(label_1)
        if l1 is None or abs(l0 + l1 - 1.0) > 1e-9:
            return None, f"label_0={label_0!r}, label_1={label_1!r} do not sum to 1"
    return l0, ""
