"""SmPO's per-pair proxy probability reaches the train step's batches: the train stage reads
the select manifest's proxy_margin (after relabelling) by pair_id, and the loader adds it to
every batch as `proxy_prob`."""
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fifa_jax.errors import InputError
from fifa_jax.training import pref_loss, train


def _manifest(root, cols):
    (root / "select").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), root / "select" / "manifest.parquet")


def test_lookup_by_pair_id(tmp_path):
    tc = ml_collections.ConfigDict({"smpo_temperature": 20.0})
    ids = np.array([7, 3, 11, 5], np.int64)
    proxy = np.array([4.0, -2.0, 0.0, 10.0])
    _manifest(tmp_path, {"pair_id": ids, "margin_signed": -proxy, "proxy_margin": proxy})
    lookup = train.proxy_probabilities(tmp_path, tc)
    got = lookup(np.array([11, 7, 5, 3, 7]))
    want = [1 / (1 + np.exp(-m / 20.0)) for m in (0.0, 4.0, 10.0, -2.0, 4.0)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(InputError, match="pair_id 8"):
        lookup(np.array([7, 8]))


def test_older_manifest_falls_back_to_margin_signed(tmp_path):
    tc = ml_collections.ConfigDict({"smpo_temperature": pref_loss.SMPO_TEMPERATURE})
    _manifest(tmp_path, {"pair_id": np.array([1, 2], np.int64),
                         "margin_signed": np.array([3.0, -1.0])})
    got = train.proxy_probabilities(tmp_path, tc)(np.array([2, 1]))
    np.testing.assert_allclose(got, pref_loss.proxy_probability(np.array([-1.0, 3.0])))


def test_loader_adds_pair_values():
    """PairLoader.read calls each pair_values function on the batch's pair ids."""
    from fifa_jax.training.loader import PairLoader

    class Source:
        def __getitems__(self, idx):
            return [{"pair_id": 10 + i, "prompt_row": 0,
                     "moments_w": np.zeros((2, 1, 1), np.float32),
                     "moments_l": np.zeros((2, 1, 1), np.float32)} for i in idx]

    class Prompts:
        def __getitems__(self, rows):
            return [{"prompt_embeds": np.zeros((1, 2), np.float32)} for _ in rows]

    loader = PairLoader.__new__(PairLoader)          # the reading part only, no files
    loader._pairs, loader._prompts, loader.has_flips, loader.seed = Source(), Prompts(), False, 0
    loader.pair_values = {"proxy_prob": lambda ids: ids.astype(np.float32) / 100}
    out = loader.read([0, 2])
    np.testing.assert_allclose(out["proxy_prob"], [0.10, 0.12])
