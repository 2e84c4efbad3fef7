"""The encode stage's datasets on disk: written through tfds builders, opened without them.

    <encode dir>/tfds/fifa_dpo_pairs/1.0.0/     splits train, validation (array_record)
    <encode dir>/tfds/fifa_dpo_prompts/1.0.0/   split prompts
    <encode dir>/empty_prompt.npz               prompt_embeds (L, D) [, pooled (P,)] of ""
    <encode dir>/dataset_spec.json              shapes, dtypes, flips, model facts

Open them as a user would (no TensorFlow needed):

    import tensorflow_datasets as tfds
    pairs = tfds.builder_from_directory(f"{encode_dir}/tfds/fifa_dpo_pairs/1.0.0")
    train = pairs.as_data_source("train")      # random access: train[i] -> dict of numpy

or with `open_builder(encode_dir, "pairs")` / `data_source(encode_dir, "pairs", "train")`.
A split with no examples is not written (tfds refuses empty splits): `data_source` says so.
Record order is generation order (train: the manifest's rank order less skipped pairs).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
from typing import Callable, Iterable, Mapping

import numpy as np

TFDS_DIR = "tfds"
NAMES = {"pairs": "fifa_dpo_pairs", "prompts": "fifa_dpo_prompts"}
VERSION = "1.0.0"
EMPTY_PROMPT = "empty_prompt.npz"
SPEC = "dataset_spec.json"
PROMPTS_SPLIT = "prompts"


def dataset_dir(encode_dir, which: str) -> pathlib.Path:
    """encode_dir/tfds/<fifa_dpo_pairs | fifa_dpo_prompts>/1.0.0 (`which`: pairs | prompts)."""
    if which not in NAMES:
        raise ValueError(f"dataset must be one of {sorted(NAMES)}, got {which!r}")
    return pathlib.Path(encode_dir) / TFDS_DIR / NAMES[which] / VERSION


def open_builder(encode_dir, which: str):
    """A read-only tfds builder for the pairs or prompts dataset of an encode output."""
    import tensorflow_datasets as tfds
    path = dataset_dir(encode_dir, which)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(f"{path}: no tfds dataset here; run the encode stage first")
    return tfds.builder_from_directory(str(path))


def data_source(encode_dir, which: str, split: str):
    """`builder.as_data_source(split)`: len() and [i] / __getitems__ -> dicts of numpy."""
    builder = open_builder(encode_dir, which)
    if split not in builder.info.splits:
        raise ValueError(f"{dataset_dir(encode_dir, which)} has no split {split!r} (splits: "
                         f"{sorted(builder.info.splits)}; an empty split is not written)")
    return builder.as_data_source(split)


def read_spec(encode_dir) -> dict:
    path = pathlib.Path(encode_dir) / SPEC
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the encode stage first")
    return json.loads(path.read_text())


def load_empty_prompt(encode_dir) -> dict[str, np.ndarray]:
    """The empty prompt's states, for caption dropout: prompt_embeds (L, D) [, pooled (P,)]."""
    path = pathlib.Path(encode_dir) / EMPTY_PROMPT
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the encode stage first")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_datasets(encode_dir, *, pairs_spec: Mapping, prompts_spec: Mapping,
                   pair_splits: Mapping[str, Callable[[], Iterable[dict]]],
                   prompt_examples: Callable[[], Iterable[dict]]) -> dict[str, int]:
    """Build both tfds datasets into encode_dir/tfds (replacing what is there).

    Args:
      pairs_spec: {moments_shape, dtype, flip} (see tfds_pairs.FifaDpoPairs).
      prompts_spec: {embeds_shape, pooled_dim, dtype}.
      pair_splits: {split: () -> iterable of example dicts}; give only non-empty splits.
      prompt_examples: () -> iterable of prompt example dicts (at least one).
    Returns: {"pairs": bytes, "prompts": bytes} written.
    """
    import tensorflow_datasets as tfds
    from fifa_jax.training.tfds_pairs import FifaDpoPairs, FifaDpoPrompts
    encode_dir = pathlib.Path(encode_dir)
    final, tmp = encode_dir / TFDS_DIR, encode_dir / (TFDS_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tfds.disable_progress_bar()
    for cls, spec, splits in ((FifaDpoPairs, pairs_spec, pair_splits),
                              (FifaDpoPrompts, prompts_spec,
                               {PROMPTS_SPLIT: prompt_examples})):
        builder = cls(data_dir=str(tmp), spec=spec, splits=splits)
        # tfds prints "Downloading and preparing ... downloaded" (about a temporary folder)
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(file_format="array_record",
                                         download_dir=str(tmp / "_downloads"))
    shutil.rmtree(tmp / "_downloads", ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {which: _dir_bytes(final / name) for which, name in NAMES.items()}


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
