"""Two tfds builders written in `array_record` (no TensorFlow needed):

  fifa_dpo_pairs    splits train (the manifest's pairs) and validation (held-out pairs);
                    one example per encoded pair:
                      pair_id int64, prompt_row int64 (row of fifa_dpo_prompts),
                      moments_w, moments_l (2C, h, w): the VAE posterior [mean; logvar] stacked
                      on the channel axis, PyTorch layout; with flips also moments_w_flip,
                      moments_l_flip (the posterior of the horizontally flipped image)
  fifa_dpo_prompts  split `prompts`: one example per unique prompt of either split:
                      prompt_id int64, prompt_embeds (L, D) [, pooled (P,) for SDXL]

Big arrays are `Tensor(encoding="bytes")` (raw bytes, float16 or float32 kept as stored).
Examples are written in generation order (`disable_shuffling`, keyed by a running index), so
record i is the i-th example the writer produced. The feature shapes depend on the model, so
the builders take a `spec` dict; a finished dataset is read back without it, by
`tfds.builder_from_directory`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds


def _tensor(shape, dtype: str, doc: str):
    return tfds.features.Tensor(shape=tuple(int(s) for s in shape), dtype=np.dtype(dtype),
                                encoding="bytes", doc=doc)


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: a spec for the features, example generators per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First layout."}

    # tfds finds a builder's code folder through `importlib_resources` for a class in a
    # package's submodule, a backport not installed here; the file itself is enough
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        from etils import epath
        import inspect
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, spec: Mapping, splits: Mapping[str, Callable[[], Iterable[dict]]]
                 | None = None, **kwargs):
        """spec: feature shapes/dtypes (see the subclasses); splits: {split: () -> examples}
        (only to write; each example a dict of the features)."""
        self._spec = dict(spec)
        self._splits = dict(splits or {})
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(name) for name in self._splits}

    def _generate_examples(self, split):
        # with disable_shuffling tfds orders records by key: the running index keeps the
        # generation order
        for i, ex in enumerate(self._splits[split]()):
            yield i, ex


class FifaDpoPairs(_Builder):
    """spec: moments_shape (2C, h, w), dtype ("float32" | "float16"), flip (bool)."""

    def _info(self):
        s = self._spec
        feats = {"pair_id": tfds.features.Scalar(np.int64, doc="ingest pair_id"),
                 "prompt_row": tfds.features.Scalar(np.int64, doc="row of fifa_dpo_prompts")}
        names = ["moments_w", "moments_l"] + (["moments_w_flip", "moments_l_flip"]
                                              if s["flip"] else [])
        for name in names:
            feats[name] = _tensor(s["moments_shape"], s["dtype"],
                                  "VAE posterior [mean; logvar] on the channel axis (2C, h, w)")
        return self.dataset_info_from_configs(
            description="Diffusion-DPO pairs as VAE posteriors (fifa_jax encode stage).",
            features=tfds.features.FeaturesDict(feats), disable_shuffling=True,
            metadata=tfds.core.MetadataDict(dict(s)))


class FifaDpoPrompts(_Builder):
    """spec: embeds_shape (L, D), pooled_dim (P or None), dtype."""

    def _info(self):
        s = self._spec
        feats = {"prompt_id": tfds.features.Scalar(np.int64, doc="ingest prompt_id"),
                 "prompt_embeds": _tensor(s["embeds_shape"], s["dtype"],
                                          "text encoder states (L, D), as prompt_embeds")}
        if s.get("pooled_dim"):
            feats["pooled"] = _tensor((s["pooled_dim"],), s["dtype"],
                                      "pooled projection of text encoder 2 (SDXL)")
        return self.dataset_info_from_configs(
            description="Text encoder states per unique prompt (fifa_jax encode stage).",
            features=tfds.features.FeaturesDict(feats), disable_shuffling=True,
            metadata=tfds.core.MetadataDict(dict(s)))
