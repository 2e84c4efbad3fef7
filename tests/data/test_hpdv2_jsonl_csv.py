"""HPDv2 annotation JSON and the plain JSONL / CSV layouts: pairs, winners, skips, errors."""
import csv
import json

import pytest

from fifa_jax.data import images, ingest
from fifa_jax.data.schema import IngestError
from tests.data import _util

COL = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (200, 200, 30),
       "e": (200, 30, 200), "f": (30, 200, 200)}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    for name, colour in COL.items():
        (d / "sub" / f"{name}.jpg").write_bytes(_util.jpeg(colour))
    (d / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return d


def winners(pairs):
    return [(_util.colour_of(images.load_image(p["winner_ref"])),
             _util.colour_of(images.load_image(p["loser_ref"]))) for p in pairs]


# -- HPDv2 -----------------------------------------------------------------------------------

def test_hpdv2_rank_and_human_preference(image_dir, tmp_path):
    records = [
        # test.json style: rank, lower is better; b best, a and c tied
        {"prompt": "three", "image_path": ["sub/a.jpg", "sub/b.jpg", "sub/c.jpg"],
         "rank": [2, 1, 2], "raw_annotations": []},
        # train.json style: 1 marks the preferred image
        {"prompt": "two", "file_path": ["sub/d.jpg", "sub/e.jpg"], "human_preference": [0, 1]},
        {"prompt": "bad", "image_path": ["sub/a.jpg"], "rank": [1, 2]},         # bad record
        {"prompt": "gone", "image_path": ["sub/f.jpg", "sub/missing.jpg"], "rank": [1, 2]},
        {"prompt": "  ", "image_path": ["sub/a.jpg", "sub/b.jpg"], "rank": [1, 2]},
        {"prompt": "broken", "image_path": ["sub/broken.jpg", "sub/b.jpg"], "rank": [1, 2]},
    ]
    ann = image_dir / "test.json"
    ann.write_text(json.dumps(records))
    ingest.run(_util.config("hpdv2", ann), tmp_path)
    pairs, prompts, report = _util.outputs(tmp_path)
    # record 0: (a,b) b wins -> swapped; (a,c) tie -> dropped; (b,c) b wins
    assert winners(pairs) == [(COL["b"], COL["a"]), (COL["b"], COL["c"]), (COL["e"], COL["d"])]
    assert [p["source_row"] for p in pairs] == [0, 0, 1]
    assert [p["label_0"] for p in pairs] == [0.0, 1.0, 0.0]
    assert pairs[0]["winner_ref"] == str(image_dir / "sub" / "b.jpg")
    assert {p["winner_model"] for p in pairs} == {""}
    assert report["rows_read"] == 3 + 1 + 1 + 1 + 1 + 1
    assert report["ties_dropped"] == 1 and report["swapped"] == 2
    assert report["skipped"]["bad_record"] == 1 and report["skipped"]["missing_image"] == 1
    assert report["skipped"]["empty_prompt"] == 1
    assert report["skipped"]["undecodable_image"] == 1
    assert report["accounted"]
    assert [(p["text"], p["n_pairs"]) for p in prompts] == [("three", 2), ("two", 1)]

    ingest.run(_util.config("hpdv2", ann, keep_ties=True), tmp_path / "ties")
    pairs, _, report = _util.outputs(tmp_path / "ties")
    assert len(pairs) == 4 and pairs[1]["is_tie"]
    assert winners(pairs)[1] == (COL["a"], COL["c"])  # tie keeps its order


def test_hpdv2_image_root_and_missing_key(image_dir, tmp_path):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"prompt": "p", "file_path": ["a.jpg", "b.jpg"],
                                "human_preference": [1, 0]}]))
    ingest.run(_util.config("hpdv2", ann, image_root=str(image_dir / "sub")), tmp_path / "w")
    pairs, _, _ = _util.outputs(tmp_path / "w")
    assert winners(pairs) == [(COL["a"], COL["b"])]

    bad = tmp_path / "nop.json"
    bad.write_text(json.dumps([{"caption": "p", "image_path": ["a.jpg", "b.jpg"],
                                "rank": [1, 2]}]))
    with pytest.raises(IngestError, match=r"nop\.json: column 'prompt'"):
        ingest.run(_util.config("hpdv2", bad), tmp_path / "w2")
    bad.write_text(json.dumps([{"prompt": "p", "image_path": ["a.jpg", "b.jpg"]}]))
    with pytest.raises(IngestError, match=r"nop\.json: column 'rank'.*human_preference"):
        ingest.run(_util.config("hpdv2", bad), tmp_path / "w2")


# -- JSONL / CSV -----------------------------------------------------------------------------

USER_ROWS = [
    {"prompt": "red vs green", "image_0": "sub/a.jpg", "image_1": "sub/b.jpg", "label_0": 1,
     "model_0": "x", "model_1": "y"},
    {"prompt": "blue vs yellow", "image_0": "sub/c.jpg", "image_1": "sub/d.jpg", "label_0": 0,
     "label_1": 1, "model_0": "x", "model_1": "y"},
    {"prompt": "tie", "image_0": "sub/e.jpg", "image_1": "sub/f.jpg", "label_0": 0.5},
    {"prompt": "remote", "image_0": "https://example.com/a.jpg", "image_1": "sub/b.jpg",
     "label_0": 1},
    {"prompt": "absent", "image_0": "sub/zzz.jpg", "image_1": "sub/b.jpg", "label_0": 1},
    {"prompt": "odd label", "image_0": "sub/a.jpg", "image_1": "sub/b.jpg", "label_0": 2},
    {"prompt": "", "image_0": "sub/a.jpg", "image_1": "sub/b.jpg", "label_0": 1},
    {"prompt": "red vs green", "image_0": "sub/b.jpg", "image_1": "sub/a.jpg", "label_0": 0},
]


def test_jsonl(image_dir, tmp_path):
    path = image_dir / "prefs.jsonl"
    lines = [json.dumps(r) for r in USER_ROWS[:3]] + ["", "{not json", "[1, 2]",
                                                        json.dumps({"prompt": "no images"})]
    lines += [json.dumps(r) for r in USER_ROWS[3:]]
    path.write_text("\n".join(lines) + "\n")
    ingest.run(_util.config("jsonl", path), tmp_path)
    pairs, prompts, report = _util.outputs(tmp_path)
    assert winners(pairs) == [(COL["a"], COL["b"]), (COL["d"], COL["c"])]
    assert pairs[1]["winner_model"] == "y" and pairs[1]["source_row"] == 1
    assert report["rows_read"] == len(USER_ROWS) + 3  # the blank line is not a row
    assert report["skipped"] == {"empty_prompt": 1, "bad_label": 1, "missing_image": 2,
                                 "undecodable_image": 0, "same_image": 0, "duplicate": 1,
                                 "bad_record": 3, "bad_encoding": 0, "outside_root": 0,
                                 "image_too_large": 0}
    assert report["ties_dropped"] == 1 and report["accounted"]
    assert any("not fetched" in e for e in report["skip_examples"]["missing_image"])
    assert any("row 4" in e and "invalid JSON" in e for e in report["skip_examples"]["bad_record"])


def test_jsonl_first_record_needs_required_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "p", "image_0": "a", "image_1": "b"}) + "\n")
    with pytest.raises(IngestError, match=r"x\.jsonl: column 'label_0'"):
        ingest.run(_util.config("jsonl", path), tmp_path / "w")


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def test_csv(image_dir, tmp_path):
    path = tmp_path / "prefs.csv"   # images live elsewhere: image_root
    _write_csv(path, USER_ROWS, ["prompt", "image_0", "image_1", "label_0", "label_1",
                                 "model_0", "model_1"])
    ingest.run(_util.config("csv", path, image_root=str(image_dir), keep_ties=True), tmp_path)
    pairs, prompts, report = _util.outputs(tmp_path)
    assert winners(pairs) == [(COL["a"], COL["b"]), (COL["d"], COL["c"]), (COL["e"], COL["f"])]
    assert [p["is_tie"] for p in pairs] == [False, False, True]
    assert report["rows_read"] == len(USER_ROWS) and report["accounted"]
    assert report["skipped"]["duplicate"] == 1 and report["skipped"]["bad_label"] == 1
    assert [p["text"] for p in prompts] == ["red vs green", "blue vs yellow", "tie"]


def test_csv_missing_column(tmp_path):
    path = tmp_path / "m.csv"
    _write_csv(path, USER_ROWS[:1], ["prompt", "image_0", "image_1"])
    with pytest.raises(IngestError, match=r"m\.csv: column 'label_0'"):
        ingest.run(_util.config("csv", path), tmp_path / "w")


def test_nothing_kept_is_an_error_with_the_report_written(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"prompt": " ", "image_0": "a", "image_1": "b",
                                "label_0": 1}) + "\n")
    with pytest.raises(IngestError, match=r"no pair kept out of 1 row.*'empty_prompt': 1"):
        ingest.run(_util.config("jsonl", path), tmp_path / "w")
    assert (tmp_path / "w" / "ingest" / "ingest_report.json").exists()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_utf8_bom_is_not_part_of_the_first_column(image_dir, tmp_path, fmt):
    """Spreadsheet exports start with a UTF-8 BOM: it must not rename 'prompt' or spoil row 0."""
    path = tmp_path / f"bom.{fmt}"
    if fmt == "csv":
        text = "prompt,image_0,image_1,label_0\nred vs green,sub/a.jpg,sub/b.jpg,1\n"
    else:
        text = json.dumps(USER_ROWS[0]) + "\n"
    path.write_bytes(text.encode("utf-8-sig"))
    ingest.run(_util.config(fmt, path, image_root=str(image_dir)), tmp_path / "w")
    pairs, prompts, report = _util.outputs(tmp_path / "w")
    assert winners(pairs) == [(COL["a"], COL["b"])] and report["skipped_total"] == 0
    assert prompts[0]["text"] == "red vs green"


def test_hpdv2_non_finite_preference_is_bad_record(image_dir, tmp_path):
    """json.load accepts NaN / Infinity: such a record is bad_record, not a tie."""
    ann = tmp_path / "nan.json"
    ann.write_text('[{"prompt": "ok", "image_path": ["sub/a.jpg", "sub/b.jpg"], "rank": [1, 2]},'
                   ' {"prompt": "nan", "image_path": ["sub/a.jpg", "sub/b.jpg", "sub/c.jpg"],'
                   '  "rank": [1, NaN, 2]},'
                   ' {"prompt": "inf", "file_path": ["sub/d.jpg", "sub/e.jpg"],'
                   '  "human_preference": [Infinity, 0]}]')
    ingest.run(_util.config("hpdv2", ann, image_root=str(image_dir)), tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert winners(pairs) == [(COL["a"], COL["b"])]
    assert report["skipped"]["bad_record"] == 2 and report["ties_seen"] == 0
    assert all("non-finite" in e for e in report["skip_examples"]["bad_record"])
    assert report["accounted"]


def test_hpdv2_not_utf8_is_one_error(tmp_path):
    ann = tmp_path / "latin1.json"
    ann.write_bytes(b'[{"prompt": "caf\xe9", "image_path": ["a.jpg", "b.jpg"], "rank": [1, 2]}]')
    with pytest.raises(IngestError, match=r"latin1\.json: not UTF-8: byte 0xe9"):
        ingest.run(_util.config("hpdv2", ann), tmp_path / "w")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_bad_utf8_row_is_skipped_and_counted(image_dir, tmp_path, fmt):
    """One non-UTF-8 byte skips its row (bad_encoding, file/row/line named), not the run."""
    good = [dict(USER_ROWS[0]), dict(USER_ROWS[1])]
    if fmt == "csv":
        head, enc = "prompt,image_0,image_1,label_0\n", lambda r: (
            f"{r['prompt']},{r['image_0']},{r['image_1']},{r['label_0']}\n")
    else:
        head, enc = "", lambda r: json.dumps(r) + "\n"
    bad = enc(dict(USER_ROWS[0], prompt="caf@")).encode().replace(b"@", b"\xe9")
    path = tmp_path / f"mixed.{fmt}"
    path.write_bytes(head.encode() + enc(good[0]).encode() + bad + enc(good[1]).encode())
    ingest.run(_util.config(fmt, path, image_root=str(image_dir)), tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert winners(pairs) == [(COL["a"], COL["b"]), (COL["d"], COL["c"])]
    assert [p["source_row"] for p in pairs] == [0, 2]
    assert report["skipped"]["bad_encoding"] == 1 and report["skipped_total"] == 1
    [example] = report["skip_examples"]["bad_encoding"]
    line = 3 if fmt == "csv" else 2
    assert f"mixed.{fmt} row 1: line {line} is not UTF-8 (byte 0xe9" in example
    assert report["accounted"]


def test_csv_header_not_utf8_and_unparsable_record(image_dir, tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"prompt,image_0,image_1,label_0,caf\xe9\n")
    with pytest.raises(IngestError, match=r"h\.csv: header \(line 1\) is not UTF-8"):
        ingest.run(_util.config("csv", path), tmp_path / "w")
    # a quoted field over the csv module's default limit (128 KiB), with a line break inside,
    # is read whole: the record after it is intact
    path.write_text("prompt,image_0,image_1,label_0\n"
                    f'"{"x" * 200_000}\nstill the caption",sub/a.jpg,sub/b.jpg,1\n'
                    "red vs green,sub/a.jpg,sub/b.jpg,1\n")
    ingest.run(_util.config("csv", path, image_root=str(image_dir)), tmp_path / "w")
    pairs, prompts, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == [0, 1] and report["accounted"]
    assert prompts[0]["text"].endswith("still the caption") and len(prompts[0]["text"]) > 200_000


def test_same_image_files(image_dir, tmp_path):
    """The same path twice, or two files with identical bytes: skipped as same_image."""
    copy = tmp_path / "a_copy.jpg"   # outside the image root: allow_outside_root below
    copy.write_bytes((image_dir / "sub" / "a.jpg").read_bytes())
    a = str(image_dir / "sub" / "a.jpg")
    rows = [dict(USER_ROWS[0], image_0=a, image_1=a),                 # same path twice
            dict(USER_ROWS[0], image_0=str(copy)),                       # copy vs b: kept
            dict(USER_ROWS[0], image_0="sub/a.jpg", image_1=str(copy)),  # identical bytes
            USER_ROWS[1]]
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.run(_util.config("jsonl", path, image_root=str(image_dir), allow_outside_root=True),
               tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == [1, 3]
    assert report["skipped"]["same_image"] == 2 and report["same_image_pairs"] == 2
    assert report["skipped"]["undecodable_image"] == 0 and report["accounted"]
