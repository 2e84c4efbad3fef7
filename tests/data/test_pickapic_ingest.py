"""Ingest of tiny Pick-a-Pic-layout shards with real JPEG bytes: every rule, every count."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fifa_jax.data import images, ingest, pickapic
from fifa_jax.data.schema import IngestError
from tests.data import _util

RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
MAGENTA, CYAN, GREY, ORANGE = (200, 30, 200), (30, 200, 200), (120, 120, 120), (250, 150, 50)


def noisy_jpeg(seed=0, size=64) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def row(caption, c0, c1, l0, l1=None, m0="m0", m1="m1", jpg_0=None, jpg_1=None):
    return {"caption": caption,
            "jpg_0": jpg_0 if jpg_0 is not None else (_util.jpeg(c0) if c0 else None),
            "jpg_1": jpg_1 if jpg_1 is not None else (_util.jpeg(c1) if c1 else None),
            "label_0": l0, "label_1": (1.0 - l0) if l1 is None and l0 is not None else l1,
            "model_0": m0, "model_1": m1}


TRUNCATED = noisy_jpeg()[: len(noisy_jpeg()) * 3 // 5]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("pickapic")
    s1 = [
        row("a cat", RED, GREEN, 1.0, m0="mA", m1="mB"),          # kept
        row("a dog", BLUE, YELLOW, 0.0, m0="mC", m1="mD"),        # kept, swapped
        row("  a cat  ", MAGENTA, CYAN, 0.5),                     # tie
        row("a cat", RED, None, 1.0, jpg_1=b"not a jpeg at all"),  # undecodable
        row("   ", RED, GREEN, 1.0),                              # empty prompt
        row(None, RED, GREEN, 1.0),                               # empty prompt (null)
        row("a fish", RED, GREEN, 0.3),                           # bad label
        row("a fish", RED, GREEN, 1.0, l1=1.0),                   # labels do not sum to 1
    ]
    s2 = [
        row("a cat", RED, GREEN, 1.0),                            # duplicate
        row("a cat", GREEN, RED, 0.0),                            # duplicate (same winner)
        row("a dog", BLUE, YELLOW, 1.0),                          # duplicate, other winner
        row("a bird", None, MAGENTA, 1.0),                        # missing image (null)
        row("a bird", GREY, None, 1.0, jpg_1=TRUNCATED),          # truncated JPEG
        row("a bird", GREY, ORANGE, 1.0),                         # kept
        row("A cat", RED, GREEN, 0.0),                            # kept: prompts are exact
    ]
    _util.write_shard(d / "train-0.parquet", s1, row_group_size=4)
    _util.write_shard(d / "train-1.parquet", s2, row_group_size=3)
    (d / "notes.txt").write_text("not a shard")
    return d


@pytest.fixture(scope="module")
def default_run(shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    summary = ingest.run(_util.config("pickapic", shards), work)
    return summary, _util.outputs(work)


def test_counts_by_reason(default_run):
    summary, (pairs, prompts, report) = default_run
    assert report["rows_read"] == 15
    assert report["pairs_kept"] == 4
    assert report["skipped"] == {"empty_prompt": 2, "bad_label": 2, "missing_image": 1,
                                 "undecodable_image": 2, "same_image": 0, "duplicate": 3,
                                 "bad_record": 0, "bad_encoding": 0, "outside_root": 0,
                                 "image_too_large": 0}
    assert report["ties_seen"] == report["ties_dropped"] == 1 and report["ties_kept"] == 0
    assert report["swapped"] == 2  # "a dog" and "A cat"
    assert report["duplicates_conflicting"] == 1
    assert report["accounted"] and report["skipped_total"] == 10
    assert summary["pairs_kept"] == 4 and summary["skipped_duplicate"] == 3
    assert len(report["sources"]) == 2  # notes.txt is not a shard
    ex = report["skip_examples"]["undecodable_image"]
    assert any("train-0.parquet row 3" in e for e in ex)
    assert any("train-1.parquet row 4" in e for e in ex)


def test_winner_first_and_refs(default_run, shards):
    _, (pairs, _, _) = default_run
    assert [p["pair_id"] for p in pairs] == [0, 1, 2, 3]
    got = [(_util.colour_of(images.load_image(p["winner_ref"])),
            _util.colour_of(images.load_image(p["loser_ref"]))) for p in pairs]
    assert got == [(RED, GREEN), (YELLOW, BLUE), (GREY, ORANGE), (GREEN, RED)]
    dog = pairs[1]
    assert dog["label_0"] == 0.0 and not dog["is_tie"]
    assert dog["winner_model"] == "mD" and dog["loser_model"] == "mC"
    assert dog["winner_ref"] == images.make_ref(shards / "train-0.parquet", 1, "jpg_1")
    assert dog["source"] == str(shards / "train-0.parquet") and dog["source_row"] == 1
    assert pairs[2]["source_row"] == 5


def test_unique_prompts(default_run):
    _, (pairs, prompts, report) = default_run
    assert [(p["prompt_id"], p["text"], p["n_pairs"]) for p in prompts] == [
        (0, "a cat", 1), (1, "a dog", 1), (2, "a bird", 1), (3, "A cat", 1)]
    assert [p["prompt_id"] for p in pairs] == [0, 1, 2, 3]
    assert report["unique_prompts"] == 4


def test_keep_ties(shards, tmp_path):
    ingest.run(_util.config("pickapic", shards, keep_ties=True), tmp_path)
    pairs, prompts, report = _util.outputs(tmp_path)
    assert report["pairs_kept"] == 5 and report["ties_kept"] == 1
    assert report["ties_dropped"] == 0 and report["accounted"]
    tie = pairs[2]
    assert tie["is_tie"] and tie["label_0"] == 0.5 and tie["source_row"] == 2
    assert tie["winner_ref"].endswith("::2::jpg_0") and tie["loser_ref"].endswith("::2::jpg_1")
    assert _util.colour_of(images.load_image(tie["winner_ref"])) == MAGENTA
    assert prompts[0] == {"prompt_id": 0, "text": "a cat", "n_pairs": 2}  # stripped text
    assert sum(p["n_pairs"] for p in prompts) == len(pairs)


def test_max_rows_and_single_file(shards, tmp_path):
    ingest.run(_util.config("pickapic", shards / "train-0.parquet", max_rows=5,
                            batch_rows=2, num_workers=1), tmp_path)
    pairs, _, report = _util.outputs(tmp_path)
    assert report["rows_read"] == 5 and report["stopped_at_max_rows"]
    assert len(pairs) == 2 and report["accounted"]


def test_header_check_misses_truncation(shards, tmp_path):
    """check_images='header' is cheap: garbage fails, a JPEG cut after its header passes."""
    ingest.run(_util.config("pickapic", shards, check_images="header"), tmp_path)
    _, _, report = _util.outputs(tmp_path)
    assert report["skipped"]["undecodable_image"] == 1
    assert report["pairs_kept"] == 5


def test_glob_and_list_paths(shards):
    both = pickapic.resolve_files(str(shards / "train-*.parquet"))
    assert [p.rsplit("/", 1)[1] for p in both] == ["train-0.parquet", "train-1.parquet"]
    assert pickapic.resolve_files(f"{shards}/train-1.parquet,{shards}/train-0.parquet") == \
        both[::-1]
    with pytest.raises(IngestError, match="no such file"):
        pickapic.resolve_files(str(shards / "nope.parquet"))


def test_missing_column_names_file_and_column(tmp_path):
    bad = _util.write_shard(tmp_path / "bad.parquet", [row("x", RED, GREEN, 1.0)],
                            drop=("label_0",))
    with pytest.raises(IngestError, match=r"bad\.parquet.*'label_0'"):
        ingest.run(_util.config("pickapic", bad), tmp_path / "w")
    assert not (tmp_path / "w" / "ingest" / "pairs.parquet").exists()


def test_wrong_column_type_names_column(tmp_path):
    bad = _util.write_shard(tmp_path / "typed.parquet", [dict(row("x", RED, GREEN, 1.0),
                                                              caption=None)],
                            types={"caption": pa.int64()})
    with pytest.raises(IngestError, match=r"typed\.parquet.*'caption'.*expected string"):
        pickapic.check_schemas([bad])


def test_no_optional_columns(tmp_path):
    """label_1 and the model columns are optional: models become ''."""
    f = _util.write_shard(tmp_path / "min.parquet", [row("x", RED, GREEN, 0.0)],
                          drop=("label_1", "model_0", "model_1", "ranking_id"))
    ingest.run(_util.config("pickapic", f), tmp_path / "w")
    pairs, _, _ = _util.outputs(tmp_path / "w")
    assert pairs[0]["winner_model"] == "" and pairs[0]["winner_ref"].endswith("::0::jpg_1")


def test_rerun_overwrites(shards, tmp_path):
    ingest.run(_util.config("pickapic", shards), tmp_path)
    first = _util.outputs(tmp_path)[0]
    ingest.run(_util.config("pickapic", shards), tmp_path)
    assert _util.outputs(tmp_path)[0] == first
    assert sorted(p.name for p in (tmp_path / "ingest").iterdir()) == [
        "ingest_report.json", "pairs.parquet", "prompts.parquet"]


def test_bad_format_is_refused(tmp_path):
    with pytest.raises(IngestError, match="format"):
        ingest.run(_util.config("webdataset", "x"), tmp_path)


def test_check_images_none_keeps_corrupt_bytes(shards, tmp_path):
    ingest.run(_util.config("pickapic", shards, check_images="none"), tmp_path)
    _, _, report = _util.outputs(tmp_path)
    assert report["skipped"]["undecodable_image"] == 0
    assert report["skipped"]["missing_image"] == 1  # a null cell is still caught
    assert report["pairs_kept"] == 6 and report["accounted"]


def test_hugging_face_image_struct_columns(tmp_path):
    """jpg columns stored as the HF `Image` struct {bytes, path} are read the same way."""
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [dict(row("x", None, None, 0.0, jpg_0={"bytes": _util.jpeg(RED), "path": None},
                     jpg_1={"bytes": _util.jpeg(BLUE), "path": "b.jpg"}))]
    f = _util.write_shard(tmp_path / "hf.parquet", rows, types={"jpg_0": img, "jpg_1": img})
    ingest.run(_util.config("pickapic", f), tmp_path / "w")
    pairs, _, _ = _util.outputs(tmp_path / "w")
    assert _util.colour_of(images.load_image(pairs[0]["winner_ref"])) == BLUE
    assert _util.colour_of(images.load_image(pairs[0]["loser_ref"])) == RED


def test_corrupt_page_names_shard_and_row_group(tmp_path):
    """A corrupt page is one IngestError naming the shard and row group; no output is left."""
    rows = [row(f"prompt {i} " * 5, RED, GREEN, 1.0) for i in range(6)]
    f = _util.write_shard(tmp_path / "torn.parquet", rows, row_group_size=2)
    md = pq.read_metadata(f)
    col = md.row_group(1).column(md.schema.names.index("caption"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray((tmp_path / "torn.parquet").read_bytes())
    for i in range(start, start + col.total_compressed_size):
        data[i] ^= 0x5A
    (tmp_path / "torn.parquet").write_bytes(bytes(data))
    with pytest.raises(IngestError, match=r"torn\.parquet: row group 1 \(rows 2-3\)") as e:
        ingest.run(_util.config("pickapic", f), tmp_path / "w")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "w" / "ingest").iterdir()) == []


def test_same_file_named_twice_is_read_once(shards, monkeypatch):
    monkeypatch.chdir(shards.parent)
    name = f"{shards.name}/train-0.parquet"
    assert pickapic.resolve_files(f"{name},./{name},{shards}/../{name}") == [
        str(shards / "train-0.parquet")]


@pytest.mark.parametrize("keep", [False, True])
def test_same_image_on_both_sides(tmp_path, keep):
    """winner == loser (identical bytes) carries no preference: skipped unless keep_same_image."""
    f = _util.write_shard(tmp_path / "same.parquet", [
        row("same", RED, RED, 1.0),      # identical bytes (Pick-a-Pic are_different=False)
        row("pair", RED, GREEN, 1.0)])
    ingest.run(_util.config("pickapic", f, keep_same_image=keep), tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == ([0, 1] if keep else [1])
    assert report["skipped"]["same_image"] == (0 if keep else 1)
    assert report["same_image_pairs"] == 1 and report["keep_same_image"] == keep
    assert report["accounted"]
    if not keep:
        assert "same image" in report["skip_examples"]["same_image"][0]
