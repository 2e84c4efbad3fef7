"""Margins on several hosts: process 0 decides which chunks are finished and whether the cached
text features are valid; another host takes that decision even when its own view of the files
differs (stale NFS attribute caches). Simulated as process 1 of 2 with the collectives stubbed
(tests/parallel/test_multiprocess.py runs the real two-process demo pipeline)."""
import types
import zlib

import numpy as np
import pytest
from jax.experimental import multihost_utils

from fifa_jax.scoring import embeddings, margins

U = 3


@pytest.fixture
def host1(monkeypatch):
    """This process is host 1 of 2; `sent` is what process 0 broadcasts, `votes` the other
    host's answer to an all-hosts check."""
    link = {"sent": None, "votes": []}
    monkeypatch.setattr(margins.jax, "process_count", lambda: 2)
    monkeypatch.setattr(margins.jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)

    def broadcast(x, is_source=None):
        assert np.shape(x) == np.shape(link["sent"])
        return np.asarray(link["sent"])

    def allgather(x, tiled=False):
        return np.array([1, int(x)])
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return link


def test_chunk_list_comes_from_process_0(host1, tmp_path):
    host1["sent"] = np.array([1, 0, 1], np.int32)  # process 0 sees chunks 0 and 2 finished
    assert margins._prepare_chunk_dir(tmp_path, "fp", 3) == [0, 2]  # none visible here
    assert not (tmp_path / margins.CHUNK_DIR).exists()  # only process 0 touches the folder


def _text_features(tmp_path, monkeypatch, cached: np.ndarray):
    (tmp_path / margins.CHUNK_DIR).mkdir(parents=True)
    np.save(tmp_path / margins.CHUNK_DIR / "text_features.npy", cached)
    fresh = np.full((U, 4), 7.0, np.float32)
    monkeypatch.setattr(embeddings, "clip_text_features", lambda *a: fresh)
    tok = embeddings.TokenizedText(np.zeros((U, 5), np.int32), np.ones((U, 5), np.int32),
                                   np.full(U, 5), np.zeros(U, bool))
    stats = {"text_features_computed": 0}
    got = margins._text_features(types.SimpleNamespace(ensure_model=lambda: None), tok, 2,
                                 None, tmp_path, stats)
    return got, stats["text_features_computed"]


def _leader(valid: bool, feats: np.ndarray) -> np.ndarray:
    crc = zlib.crc32(np.ascontiguousarray(feats).tobytes())
    return np.array([valid, np.uint32(crc).view(np.int32)], np.int32)


def test_stale_text_feature_cache_on_another_host_is_not_used(host1, tmp_path, monkeypatch):
    stale = np.ones((U, 4), np.float32)  # right shape, but not the bytes process 0 read
    host1["sent"] = _leader(True, np.zeros((U, 4), np.float32))
    got, computed = _text_features(tmp_path, monkeypatch, stale)
    assert computed == U and np.all(got == 7.0)


def test_text_feature_cache_used_when_process_0_says_so(host1, tmp_path, monkeypatch):
    cached = np.arange(U * 4, dtype=np.float32).reshape(U, 4)
    host1["sent"] = _leader(True, cached)
    got, computed = _text_features(tmp_path, monkeypatch, cached)
    assert computed == 0 and np.array_equal(got, cached)
    host1["sent"] = _leader(False, np.zeros(0))  # process 0 has no valid cache: recompute
    got, computed = _text_features(tmp_path / "x", monkeypatch, cached)
    assert computed == U and np.all(got == 7.0)
