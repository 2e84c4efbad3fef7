"""Image refs: parse/make round trip, parquet and file loading, the thread-safe chunk cache."""
import concurrent.futures
import os
import time

import numpy as np
import pytest

from fifa_jax.data import images
from tests.data import _util

COLOURS = [(int(r), int(g), int(b)) for r, g, b in
           np.random.default_rng(0).integers(0, 26, size=(30, 3)) * 10]


@pytest.fixture
def shard(tmp_path):
    rows = [{"caption": f"p{i}", "jpg_0": _util.jpeg(COLOURS[i]),
             "jpg_1": _util.jpeg(COLOURS[-1 - i]), "label_0": 1.0} for i in range(30)]
    rows[7]["jpg_1"] = None
    return _util.write_shard(tmp_path / "s.parquet", rows, row_group_size=8)  # 4 row groups


def test_ref_round_trip():
    assert images.parse_ref(images.make_ref("/a/b::c.parquet", 12, "jpg_1")) == (
        "/a/b::c.parquet", 12, "jpg_1")
    assert images.parse_ref("/data/x.jpg") == ("/data/x.jpg", None, None)
    assert images.parse_ref("file:///data/x.jpg") == ("/data/x.jpg", None, None)
    assert images.parse_ref("/odd::name.jpg") == ("/odd::name.jpg", None, None)
    with pytest.raises(ValueError):
        images.parse_ref("")


def test_load_from_parquet_matches_source(shard):
    images.clear_cache()
    for i in (0, 7, 8, 29):
        im = images.load_image(images.make_ref(shard, i, "jpg_0"))
        assert im.mode == "RGB" and im.size == (16, 16)
        assert _util.colour_of(im) == COLOURS[i]
    raw = images.load_image_bytes(images.make_ref(shard, 3, "jpg_1"))
    assert raw == _util.jpeg(COLOURS[-4])


def test_load_from_file(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(_util.jpeg((250, 0, 0)))
    assert _util.colour_of(images.load_image(str(p))) == (250, 0, 0)
    assert _util.colour_of(images.load_image("file://" + str(p))) == (250, 0, 0)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        images.load_image(str(tmp_path / "nope.jpg"))


def test_errors_name_the_ref(shard, tmp_path):
    with pytest.raises(IndexError, match=r"::30::jpg_0: row out of range"):
        images.load_image_bytes(images.make_ref(shard, 30, "jpg_0"))
    with pytest.raises(KeyError, match="no column 'png_0'"):
        images.load_image_bytes(images.make_ref(shard, 0, "png_0"))
    with pytest.raises(ValueError, match=r"::7::jpg_1: cell is null"):
        images.load_image_bytes(images.make_ref(shard, 7, "jpg_1"))
    with pytest.raises(TypeError, match=r"::0::caption: cell holds str"):
        images.load_image(images.make_ref(shard, 0, "caption"))
    with pytest.raises(TypeError, match=r"::0::label_0: cell holds float"):
        images.load_image(images.make_ref(shard, 0, "label_0"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match=r"junk\.jpg: cannot decode image"):
        images.load_image(str(junk))


def test_threaded_reads_touch_each_chunk_once(shard):
    images.clear_cache()
    refs = [images.make_ref(shard, i, c) for i in range(30) for c in ("jpg_0",)] * 3
    before = images.cache_reads()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: _util.colour_of(images.load_image(r)), refs))
    assert got == [COLOURS[i] for i in range(30)] * 3
    assert images.cache_reads() - before == 4  # 4 row groups of one column


def test_small_cache_limit_still_correct(shard):
    images.clear_cache()
    images.set_cache_limit(1)  # keeps only the newest chunk
    try:
        refs = [images.make_ref(shard, i, c) for i in (0, 29, 1, 28) for c in ("jpg_0", "jpg_1")
                if not (i == 7 and c == "jpg_1")]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda r: _util.colour_of(images.load_image(r)), refs))
        want = [COLOURS[i] if c == "jpg_0" else COLOURS[-1 - i]
                for i in (0, 29, 1, 28) for c in ("jpg_0", "jpg_1")]
        assert got == want
    finally:
        images.set_cache_limit(images.DEFAULT_CACHE_BYTES)


def test_rewritten_file_is_not_served_stale(tmp_path):
    path = tmp_path / "r.parquet"
    _util.write_shard(path, [{"caption": "a", "jpg_0": _util.jpeg((0, 0, 250)), "label_0": 1.0}])
    ref = images.make_ref(path, 0, "jpg_0")
    assert _util.colour_of(images.load_image(ref)) == (0, 0, 250)
    time.sleep(0.01)
    _util.write_shard(path, [{"caption": "a", "jpg_0": _util.jpeg((0, 250, 0)), "label_0": 1.0}])
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert _util.colour_of(images.load_image(ref)) == (0, 250, 0)


def test_verify_modes():
    good = _util.jpeg((10, 20, 30), size=64)
    for mode in images.CHECK_MODES:
        images.verify_image_bytes(good, mode)
    with pytest.raises(Exception):
        images.verify_image_bytes(b"\xff\xd8garbage", "header")
    with pytest.raises(ValueError, match="check_images"):
        images.verify_image_bytes(good, "full")
