"""Ingest of someone else's files: image paths confined to the image root, only regular files
of bounded size read, pixel caps, CSV quoting errors recovered, binary / non-UTF-8 parquet
captions, control-character prompts (issue #13)."""
import csv
import json
import os
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fifa_jax import config_check, pipeline
from fifa_jax.data import images, ingest, pickapic
from fifa_jax.data.schema import IngestError
from tests.data import _util

COL = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (200, 200, 30),
       "e": (200, 30, 200), "f": (30, 200, 200)}
SENTINEL = (120, 120, 120)


@pytest.fixture
def tree(tmp_path):
    """tmp/data (the image root: images in sub/, links out of it, a folder named like an image)
    and tmp/outside/sentinel.jpg (a valid image that must never be opened)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    for name, colour in COL.items():
        (data / "sub" / f"{name}.jpg").write_bytes(_util.jpeg(colour))
    (outside / "sentinel.jpg").write_bytes(_util.jpeg(SENTINEL))
    (data / "link.jpg").symlink_to(outside / "sentinel.jpg")
    (data / "linkdir").symlink_to(outside)
    (data / "dir.jpg").mkdir()
    return data, outside / "sentinel.jpg"


def _write(fmt: str, path, rows: list[tuple[str, str, str]]):
    """rows of (prompt, image_0, image_1), image_0 preferred, in format `fmt`."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "image_0": a, "image_1": b,
                                            "label_0": 1}) + "\n" for p, a, b in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "image_0", "image_1", "label_0"])
            w.writerows([(p, a, b, 1) for p, a, b in rows])
    else:
        path.write_text(json.dumps([{"prompt": p, "image_path": [a, b], "rank": [1, 2]}
                                    for p, a, b in rows]))
    return path


SUFFIX = {"jsonl": "jsonl", "csv": "csv", "hpdv2": "json"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "hpdv2"])
def test_image_paths_stay_inside_root(tree, tmp_path, monkeypatch, fmt):
    data, sentinel = tree
    out = str(sentinel)
    rows = [("inside", "sub/a.jpg", "sub/b.jpg"),                        # 0 kept
            ("dotdot", "../outside/sentinel.jpg", "sub/b.jpg"),          # 1 outside
            ("deep dotdot", "sub/../../outside/sentinel.jpg", "sub/c.jpg"),
            ("absolute outside", out, "sub/c.jpg"),                      # 3 outside
            ("file url outside", "file://" + out, "sub/d.jpg"),          # 4 outside
            ("symlink out", "link.jpg", "sub/d.jpg"),                    # 5 outside
            ("symlinked folder", "linkdir/sentinel.jpg", "sub/e.jpg"),   # 6 outside
            ("absolute inside", str(data / "sub" / "e.jpg"), "sub/f.jpg"),  # 7 kept
            ("inner dotdot", "sub/../sub/c.jpg", "sub/d.jpg"),           # 8 kept
            ("etc passwd", "../" * 20 + "etc/passwd", "sub/a.jpg")]      # 9 outside
    path = _write(fmt, data / f"prefs.{SUFFIX[fmt]}", rows)
    rec = _util.OpenRecorder().install(monkeypatch)
    ingest.run(_util.config(fmt, path), tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == [0, 7, 8]
    assert report["skipped"]["outside_root"] == 7 and report["skipped_total"] == 7
    assert report["accounted"] and not report["allow_outside_root"]
    assert not rec.opened(sentinel) and not rec.opened("/etc/passwd")
    assert rec.opened(data / "sub" / "a.jpg")   # the recorder sees the reads that happen
    [ex] = report["skip_examples"]["outside_root"][:1]
    assert "outside the image root" in ex and "allow_outside_root" in ex
    text = (tmp_path / "w" / "ingest" / "ingest_report.json").read_text()
    assert "root:x:" not in text and "cannot decode" not in text

    # the explicit option reads them (absolute paths, links and `..` alike)
    ingest.run(_util.config(fmt, path, allow_outside_root=True), tmp_path / "w2")
    pairs, _, report = _util.outputs(tmp_path / "w2")
    assert [p["source_row"] for p in pairs] == list(range(9))
    assert report["skipped"]["outside_root"] == 0 and report["allow_outside_root"]
    assert rec.opened(sentinel)
    assert _util.colour_of(images.load_image(pairs[1]["winner_ref"])) == SENTINEL


@pytest.mark.parametrize("allow", [False, True])
def test_special_files_are_never_opened(tree, tmp_path, monkeypatch, allow):
    """A FIFO (would block), /dev/zero (endless), a folder: skipped from their stat, never
    opened, also when paths outside the root are allowed."""
    data, _ = tree
    (data / "zero.jpg").symlink_to("/dev/zero")
    rows = [("ok", "sub/a.jpg", "sub/b.jpg"), ("fifo", "fifo.jpg", "sub/a.jpg"),
            ("folder", "dir.jpg", "sub/b.jpg"), ("dev zero", "/dev/zero", "sub/c.jpg"),
            ("zero link", "zero.jpg", "sub/d.jpg"), ("ok 2", "sub/e.jpg", "sub/f.jpg")]
    path = _write("jsonl", data / "p.jsonl", rows)
    rec = _util.OpenRecorder().install(monkeypatch)
    t0 = time.time()
    with _util.FifoWatch(data / "fifo.jpg") as fifo:
        ingest.run(_util.config("jsonl", path, allow_outside_root=allow), tmp_path / "w")
    assert not fifo.opened and time.time() - t0 < 30
    assert not rec.opened("/dev/zero") and not rec.opened(data / "dir.jpg")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == [0, 5] and report["accounted"]
    sk = report["skipped"]
    assert (sk["missing_image"], sk["outside_root"]) == ((4, 0) if allow else (2, 2))
    ex = " | ".join(report["skip_examples"]["missing_image"])
    assert "a FIFO, not an image file" in ex and "a folder, not an image file" in ex
    if allow:
        assert "a character device" in ex


def test_image_byte_and_pixel_caps(tree, tmp_path):
    """Files over max_image_bytes are not read, cells over it not decoded; images over
    max_image_pixels (exact cap, and Pillow's own guard past twice it) are not decoded."""
    data, _ = tree
    big = data / "sub" / "noisy.jpg"
    arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(big, quality=95)
    small = os.path.getsize(data / "sub" / "a.jpg")
    assert os.path.getsize(big) > 4 * small
    cap = 2 * small
    path = _write("jsonl", data / "p.jsonl", [("ok", "sub/a.jpg", "sub/b.jpg"),
                                              ("big", "sub/noisy.jpg", "sub/b.jpg")])
    ingest.run(_util.config("jsonl", path, max_image_bytes=cap), tmp_path / "w")
    pairs, _, report = _util.outputs(tmp_path / "w")
    assert [p["source_row"] for p in pairs] == [0]
    assert report["skipped"]["image_too_large"] == 1 and report["max_image_bytes"] == cap
    assert "over the cap" in report["skip_examples"]["image_too_large"][0]

    # parquet cells: the byte cap and the pixel cap (16x16 = 256 px; 18x18 = 324 px is over
    # the exact cap 300; 32x32 = 1024 px is past Pillow's guard at 2 x 300)
    rows = [{"caption": "ok", "jpg_0": _util.jpeg(COL["a"]), "jpg_1": _util.jpeg(COL["b"]),
             "label_0": 1.0},
            {"caption": "big cell", "jpg_0": big.read_bytes(), "jpg_1": _util.jpeg(COL["b"]),
             "label_0": 1.0},
            {"caption": "18", "jpg_0": _util.jpeg(COL["c"], 18), "jpg_1": _util.jpeg(COL["d"]),
             "label_0": 1.0},
            {"caption": "32", "jpg_0": _util.jpeg(COL["e"]), "jpg_1": _util.jpeg(COL["f"], 32),
             "label_0": 0.0}]
    shard = _util.write_shard(tmp_path / "s.parquet", rows)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    for mode in ("decode", "header"):
        work = tmp_path / f"p_{mode}"
        ingest.run(_util.config("pickapic", shard, max_image_bytes=cap, max_image_pixels=300,
                                check_images=mode), work)
        pairs, _, report = _util.outputs(work)
        assert [p["source_row"] for p in pairs] == [0]
        assert report["skipped"]["image_too_large"] == 3 and report["accounted"]
        ex = " | ".join(report["skip_examples"]["image_too_large"])
        assert "18x18 = 324 pixels, over the cap of 300" in ex and "decompression" in ex.lower()
    assert Image.MAX_IMAGE_PIXELS == pillow_limit   # restored after the run


def test_read_image_file_bounds(tmp_path):
    """At most max_bytes + 1 bytes are read, whatever the size stat reports (/proc files say 0)."""
    proc = "/proc/self/status"
    if not os.path.isfile(proc):
        pytest.skip("no /proc")
    with pytest.raises(images.ImageTooLargeError, match="over the cap of 8 bytes"):
        images.read_image_file(proc, max_bytes=8)
    p = tmp_path / "x.jpg"
    p.write_bytes(b"0123456789")
    assert images.read_image_file(str(p), max_bytes=10) == b"0123456789"
    assert images.read_image_file(str(p), root=str(tmp_path), read=False) is None
    with pytest.raises(images.OutsideRootError):
        images.read_image_file(str(p), root=str(tmp_path / "sub"))
    with pytest.raises(images.NotRegularFileError, match="a folder"):
        images.read_image_file(str(tmp_path))


def test_caps_are_checked(tmp_path):
    with pytest.raises(IngestError, match=r"config\.data\.max_image_bytes.*>= 1"):
        ingest.run(_util.config("demo", max_image_bytes=0), tmp_path)
    cfg = _util.config("demo", max_image_pixels=0)
    cfg.stages = "ingest"
    with pytest.raises(config_check.ConfigError, match=r"'data\.max_image_pixels' must be >= 1"):
        pipeline.validate(cfg)


# -- CSV quoting errors ------------------------------------------------------------------------

def _csv_lines(n: int) -> list[str]:
    """n data lines, each a valid row with its own prompt."""
    names = sorted(COL)
    return [f"row {i},sub/{names[i % 6]}.jpg,sub/{names[(i + 1) % 6]}.jpg,1" for i in range(n)]


@pytest.mark.parametrize("case", ["never_closed", "text_after_quote", "closed_as_a_row",
                                  "over_max_lines"])
def test_csv_stray_quote_loses_no_row(tree, tmp_path, case):
    """A stray quote on data line 10 (file line 11): that line is bad_record, naming the line;
    the lines it would have swallowed are rows of their own."""
    data, _ = tree
    n = 100 if case == "over_max_lines" else 30
    lines = _csv_lines(n)
    lines[9] = '"stray quote,sub/a.jpg,sub/b.jpg,1'
    close = 95 if case == "over_max_lines" else 20
    if case == "text_after_quote":
        lines[close] = 'a 12" screen,sub/c.jpg,sub/d.jpg,1'   # '"' then ' ': strict error
    elif case in ("closed_as_a_row", "over_max_lines"):
        lines[close] = '12",sub/c.jpg,sub/d.jpg,1'          # closes the field at a comma
    path = data / "q.csv"
    path.write_text("prompt,image_0,image_1,label_0\n" + "\n".join(lines) + "\n")
    ingest.run(_util.config("csv", path), tmp_path / "w")
    pairs, prompts, report = _util.outputs(tmp_path / "w")
    assert report["rows_read"] == n and report["accounted"]
    assert report["skipped"]["bad_record"] == 1 and report["skipped_total"] == 1
    [ex] = report["skip_examples"]["bad_record"]
    assert "q.csv row 9: line 11: quoting error" in ex
    assert [p["source_row"] for p in pairs] == [i for i in range(n) if i != 9]
    texts = {p["text"] for p in prompts}
    assert all(f"row {i}" in texts for i in range(n) if i not in (9, close))
    if case != "never_closed":
        assert lines[close].split(",")[0] in texts


def test_csv_genuine_multiline_caption_still_read_whole(tree, tmp_path):
    data, _ = tree
    path = data / "m.csv"
    path.write_text('prompt,image_0,image_1,label_0\n"two\nlines, one comma",sub/a.jpg,'
                    'sub/b.jpg,1\n"quoted, ""inner"" quotes",sub/c.jpg,sub/d.jpg,0\n')
    ingest.run(_util.config("csv", path), tmp_path / "w")
    pairs, prompts, report = _util.outputs(tmp_path / "w")
    assert [p["text"] for p in prompts] == ["two\nlines, one comma", 'quoted, "inner" quotes']
    assert report["rows_read"] == 2 and report["skipped_total"] == 0


# -- Parquet text columns ----------------------------------------------------------------------

def _invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string array holding bytes that are not UTF-8 (as some writers produce)."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets.tobytes()),
                                  pa.py_buffer(b"".join(values))])


def test_parquet_binary_caption_is_decoded_per_row(tmp_path):
    caps = [b"a cat", b"caf\xe9", None, "\u00fcber".encode(), b"\x00\x00", b"a dog"]
    rows = [{"caption": c, "jpg_0": _util.jpeg(COL["a"]), "jpg_1": _util.jpeg(COL["b"]),
             "label_0": 1.0, "model_0": b"m\xff" if i == 5 else b"m0"}
            for i, c in enumerate(caps)]
    shard = _util.write_shard(tmp_path / "bin.parquet", rows,
                              types={"caption": pa.binary(), "model_0": pa.large_binary()})
    ingest.run(_util.config("pickapic", shard), tmp_path / "w")
    pairs, prompts, report = _util.outputs(tmp_path / "w")
    assert [p["text"] for p in prompts] == ["a cat", "\u00fcber"]
    assert pairs[0]["winner_model"] == "m0"
    assert report["skipped"]["bad_encoding"] == 2 and report["skipped"]["empty_prompt"] == 2
    ex = report["skip_examples"]["bad_encoding"]
    assert "bin.parquet row 1: column 'caption' is not UTF-8 (byte 0xe9" in ex[0]
    assert "row 5: column 'model_0' is not UTF-8 (byte 0xff" in ex[1]
    assert report["accounted"]


def test_parquet_string_column_with_invalid_bytes_and_dictionary(tmp_path):
    """A string column holding non-UTF-8 bytes (unvalidated writer) and a dictionary-encoded
    one are read row by row, not a traceback."""
    n = 3
    img = [_util.jpeg(COL["a"])] * n
    table = pa.table({"caption": _invalid_utf8_strings([b"ok", b"caf\xe9", b"fine"]),
                      "jpg_0": pa.array(img, pa.binary()),
                      "jpg_1": pa.array([_util.jpeg(COL["b"])] * n, pa.binary()),
                      "label_0": [1.0] * n})
    import pyarrow.parquet as pq
    pq.write_table(table, tmp_path / "s.parquet")
    ingest.run(_util.config("pickapic", tmp_path / "s.parquet"), tmp_path / "w")
    _, prompts, report = _util.outputs(tmp_path / "w")
    assert [p["text"] for p in prompts] == ["ok", "fine"]
    assert report["skipped"]["bad_encoding"] == 1 and report["accounted"]

    table = table.set_column(0, "caption", pa.array(["x", "y", "x"]).dictionary_encode())
    pq.write_table(table, tmp_path / "d.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "d.parquet").field("caption").type)
    ingest.run(_util.config("pickapic", tmp_path / "d.parquet"), tmp_path / "w2")
    _, prompts, _ = _util.outputs(tmp_path / "w2")
    assert [p["text"] for p in prompts] == ["x", "y"]


@pytest.mark.parametrize("column,typ,match", [
    ("caption", pa.list_(pa.string()), r"column 'caption': has type list<.*expected string"),
    ("caption", pa.struct([("t", pa.string())]), r"column 'caption': has type struct"),
    ("label_0", pa.string(), r"column 'label_0': has type string, expected a number"),
    ("model_0", pa.int64(), r"column 'model_0': has type int64, expected string"),
    ("jpg_0", pa.string(), r"column 'jpg_0': has type string, expected binary"),
    ("caption", "twice", r"column 'caption': appears 2 times"),
])
def test_parquet_unexpected_column_types_are_one_line(tmp_path, column, typ, match):
    values = {"caption": "x", "jpg_0": _util.jpeg(COL["a"]), "jpg_1": _util.jpeg(COL["b"]),
              "label_0": 1.0, "model_0": "m"}
    cols = {k: pa.array([v]) for k, v in values.items()}
    names = list(cols)
    arrays = [cols[k] for k in names]
    if typ == "twice":
        names.append(column)
        arrays.append(cols[column])
    else:
        arrays[names.index(column)] = pa.array([None], typ)
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_arrays(arrays, names=names), tmp_path / "odd.parquet")
    with pytest.raises(IngestError, match=r"odd\.parquet: " + match) as e:
        ingest.run(_util.config("pickapic", tmp_path / "odd.parquet"), tmp_path / "w")
    assert "\n" not in str(e.value)


def test_fifo_among_shards_is_refused(tmp_path):
    _util.write_shard(tmp_path / "a.parquet", [{"caption": "x", "label_0": 1.0}])
    os.mkfifo(tmp_path / "b.parquet")
    with pytest.raises(IngestError, match=r"b\.parquet: not a regular file"):
        pickapic.resolve_files(str(tmp_path))
    with pytest.raises(IngestError, match=r"null: not a regular file or folder"):
        pickapic.resolve_files("/dev/null")


# -- prompts -----------------------------------------------------------------------------------

def test_control_character_prompts_are_empty(tmp_path):
    caps = ["\x00\x00", "\x1b\x07\x7f", "\u200b\ufeff", " \x00 \t", "a\x00b", "ok"]
    rows = [{"caption": c, "jpg_0": _util.jpeg(COL["a"]), "jpg_1": _util.jpeg(COL["b"]),
             "label_0": 1.0} for c in caps]
    shard = _util.write_shard(tmp_path / "c.parquet", rows)
    ingest.run(_util.config("pickapic", shard), tmp_path / "w")
    _, prompts, report = _util.outputs(tmp_path / "w")
    assert [p["text"] for p in prompts] == ["a\x00b", "ok"]
    assert report["skipped"]["empty_prompt"] == 4 and report["accounted"]
