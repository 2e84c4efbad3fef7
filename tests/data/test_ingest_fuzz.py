"""Seeded fuzz of every reader: a few hundred malformed rows of each format mixed with valid
ones. Asserts: no exception, every row accounted for (rows_read = kept + every skip + ties
dropped), every valid row kept, and no file outside the image root (a sentinel image), no FIFO
and no device ever opened; kept image files all lie inside the root."""
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from fifa_jax.data import ingest, schema
from tests.data import _util

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200),
           (30, 200, 200)]
N_ROWS = 300            # per format
MAX_BYTES = 4000        # data.max_image_bytes in the fuzz runs (the valid JPEGs are ~700 B)
MAX_PIXELS = 1600       # data.max_image_pixels (valid images: 16 x 16)


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


def _noisy_jpeg(size: int = 64) -> bytes:
    arr = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


GOOD = [_util.jpeg(c) for c in COLOURS]
BAD_BYTES = [None, b"", b"\xff\xd8\xff garbage", GOOD[0][: len(GOOD[0]) // 2], _png(48),
             _png(64), _noisy_jpeg(), b"\x00" * 64]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/ (images in sub/, a FIFO, a folder, links out of the root) and a sentinel image
    outside it; yields (root, sentinel, fifo watch)."""
    base = tmp_path_factory.mktemp("fuzz")
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for i, data in enumerate(GOOD):
        (root / "sub" / f"{i}.jpg").write_bytes(data)
    for i, data in enumerate(BAD_BYTES[1:]):
        (root / "sub" / f"bad{i}.jpg").write_bytes(data)
    sentinel = outside / "sentinel.jpg"
    sentinel.write_bytes(_util.jpeg((120, 120, 120)))
    (root / "link.jpg").symlink_to(sentinel)
    (root / "linkdir").symlink_to(outside)
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "dir.jpg").mkdir()
    with _util.FifoWatch(root / "fifo.jpg") as fifo:
        yield root, sentinel, fifo
    assert not fifo.opened


def _bad_paths(root, sentinel) -> list:
    s = str(sentinel)
    return ["../outside/sentinel.jpg", s, "file://" + s, "link.jpg", "linkdir/sentinel.jpg",
            "sub/../../outside/sentinel.jpg", "/dev/zero", "zero.jpg", "fifo.jpg", "dir.jpg",
            "sub/missing.jpg", "", "   ", "https://example.com/a.jpg", "sub/a\x00.jpg",
            "sub/\ud800.jpg", "x" * 5000, "~/x.jpg", "/", "../" * 30 + "etc/passwd", ".", None,
            17, ["sub/0.jpg"], {"p": 1}] + [f"sub/bad{i}.jpg" for i in range(len(BAD_BYTES) - 1)]


def _good_paths(root) -> list:
    """Spellings of image i that must be read: relative, ./, inner .., absolute, file://."""
    return [lambda i: f"sub/{i}.jpg", lambda i: f"./sub/{i}.jpg",
            lambda i: f"sub/../sub/{i}.jpg", lambda i: str(root / "sub" / f"{i}.jpg"),
            lambda i: "file://" + str(root / "sub" / f"{i}.jpg")]


BAD_PROMPTS = [None, "", "   ", "\x00", "\x00\x00 \x1b\x07", "\u200b\ufeff", "\ud800", 12, [1],
               {"a": 1}, True]
BAD_LABELS = [None, "", "abc", float("nan"), float("inf"), -1, 2, 0.3, True, [1], {"x": 1},
              1e309, 10 ** 400, 0.5, "0.5"]


def _valid(rng, i, root):
    a, b = rng.choice(len(GOOD), 2, replace=False)
    spell = _good_paths(root)
    label = int(rng.integers(0, 2))
    row = {"prompt": f"valid {i}", "image_0": spell[rng.integers(len(spell))](a),
           "image_1": spell[rng.integers(len(spell))](b), "label_0": label}
    if rng.random() < 0.5:
        row["label_1"] = 1 - label
    if rng.random() < 0.5:
        row.update(model_0=f"m{a}", model_1=f"m{b}")
    return row


def _corrupt(rng, i, root, sentinel) -> dict:
    """A row with 1-3 of its fields replaced by malformed values (some end up valid)."""
    row = _valid(rng, i, root)
    row["prompt"] = f"junk {i}"
    if rng.random() < 0.1:
        row["image_1"] = row["image_0"]         # same image both sides, nothing else wrong
        return row
    pools = {"prompt": BAD_PROMPTS, "image_0": _bad_paths(root, sentinel),
             "image_1": _bad_paths(root, sentinel), "label_0": BAD_LABELS,
             "label_1": BAD_LABELS + ["", None]}
    n_bad = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    for key in rng.choice(list(pools), n_bad, replace=False):
        pool = pools[key]
        row[key] = pool[rng.integers(len(pool))]
    if rng.random() < 0.1:
        del row[rng.choice(["prompt", "image_0", "image_1", "label_0"])]
    return row


def _junk_line(rng) -> bytes:
    options = [b"{not json", b"[1, 2]", b"null", b"\"a string\"", b"[" * 5000,
               b'{"prompt": ' + b"1" * 5000 + b"}", b'{"prompt": "caf\xe9", "label_0": 1}',
               bytes(int(b) for b in rng.choice([b for b in range(256) if b not in b"\r\n"],
                                                40)),
               b"\x00\x00\x00",
               b'{"prompt": "x", "image_0": "sub/0.jpg"', b"{}", b"\xef\xbb\xbf{}"]
    return options[rng.integers(len(options))]


def _check(report, prompts, n_valid_pairs, root, sentinel, rec, pairs):
    assert report["accounted"]
    assert report["rows_read"] == (report["pairs_kept"] + sum(report["skipped"].values())
                                   + report["ties_dropped"])
    kept = {p["text"]: p["n_pairs"] for p in prompts}
    for text, n in n_valid_pairs.items():
        assert kept.get(text) == n, text
    assert not rec.opened(sentinel) and not rec.opened("/dev/zero")
    assert not rec.opened("/etc/passwd") and not rec.opened(root / "fifo.jpg")
    for p in pairs:
        for ref in (p["winner_ref"], p["loser_ref"]):
            if "::" not in ref:
                assert os.path.realpath(ref).startswith(str(os.path.realpath(root)) + os.sep)
    sk = report["skipped"]
    assert set(sk) == set(schema.SKIP_REASONS)
    return sk


def _run(fmt, path, work, **kw):
    cfg = _util.config(fmt, path, max_image_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS,
                       batch_rows=37, **kw)
    ingest.run(cfg, work)
    return _util.outputs(work)


def test_fuzz_jsonl(world, tmp_path, monkeypatch):
    root, sentinel, _ = world
    rng = np.random.default_rng(13)
    lines, valid = [json.dumps(_valid(rng, 0, root)).encode()], {"valid 0": 1}
    for i in range(1, N_ROWS):
        u = rng.random()
        if u < 0.3:
            lines.append(json.dumps(_valid(rng, i, root)).encode())
            valid[f"valid {i}"] = 1
        elif u < 0.45:
            lines.append(_junk_line(rng))
        elif u < 0.5:
            lines.append(b"   ")      # blank: not a row
        else:
            lines.append(json.dumps(_corrupt(rng, i, root, sentinel)).encode())
    path = root / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rec = _util.OpenRecorder().install(monkeypatch)
    pairs, prompts, report = _run("jsonl", path, tmp_path / "w")
    sk = _check(report, prompts, valid, root, sentinel, rec, pairs)
    assert report["rows_read"] == sum(
        1 for x in lines if x.decode("utf-8", "surrogateescape").strip())
    for reason in ("outside_root", "missing_image", "image_too_large", "undecodable_image",
                   "bad_record", "bad_encoding", "empty_prompt", "bad_label", "same_image"):
        assert sk[reason] > 0, reason


def test_fuzz_csv(world, tmp_path, monkeypatch):
    root, sentinel, _ = world
    rng = np.random.default_rng(14)
    fields = ["prompt", "image_0", "image_1", "label_0", "label_1", "model_0", "model_1"]

    def line(row):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(
            ["" if row.get(k) is None else str(row[k]) for k in fields])
        return buf.getvalue().rstrip("\n").encode("utf-8", "surrogatepass")

    junk = [b'"stray quote,sub/0.jpg,sub/1.jpg,1', b'12",sub/0.jpg,sub/1.jpg,1',
            b'"abc"x,sub/0.jpg,sub/1.jpg,1', b'a "b" c,sub/0.jpg,sub/1.jpg,1',
            b"caf\xe9,sub/0.jpg,sub/1.jpg,1", b"only,two", b"a,b,c,d,e,f,g,h,i", b"\x00,\x00",
            b'"', b'""', b'"multi', b"line\"", b",,,,,,", b"\r"]
    lines, valid = [], {}
    for i in range(N_ROWS):
        u = rng.random()
        if u < 0.3:
            row = _valid(rng, i, root)
            row["prompt"] = f"valid {i}"
            lines.append(line(row))
            valid[f"valid {i}"] = 1
        elif u < 0.5:
            lines.append(junk[rng.integers(len(junk))])
        else:
            row = _corrupt(rng, i, root, sentinel)
            row = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
            lines.append(line(row))
    path = root / "fuzz.csv"
    path.write_bytes((",".join(fields) + "\n").encode() + b"\n".join(lines) + b"\n")
    rec = _util.OpenRecorder().install(monkeypatch)
    pairs, prompts, report = _run("csv", path, tmp_path / "w")
    sk = _check(report, prompts, valid, root, sentinel, rec, pairs)
    data_lines = sum(1 for x in lines if x.strip() and x != b"\r")
    assert report["rows_read"] <= data_lines
    assert sk["bad_record"] > 0 and sk["outside_root"] > 0 and sk["bad_encoding"] > 0
    assert any("quoting error" in e for e in report["skip_examples"].get("bad_record", [])) or \
        sk["bad_record"] > 5


def test_fuzz_hpdv2(world, tmp_path, monkeypatch):
    root, sentinel, _ = world
    rng = np.random.default_rng(15)
    spell = _good_paths(root)
    bad_paths = _bad_paths(root, sentinel)

    def valid_record(i):
        k = int(rng.integers(2, 4))
        imgs = rng.choice(len(GOOD), k, replace=False)
        paths = [spell[rng.integers(len(spell))](j) for j in imgs]
        ranks = [int(x) for x in rng.permutation(k) + 1]
        if rng.random() < 0.5:
            return {"prompt": f"valid {i}", "image_path": paths, "rank": ranks}
        return {"prompt": f"valid {i}", "file_path": paths,
                "human_preference": [float(x) for x in ranks]}

    records, valid = [valid_record(0)], {}
    valid["valid 0"] = len(records[0].get("rank") or records[0]["human_preference"]) * (
        len(records[0].get("rank") or records[0]["human_preference"]) - 1) // 2
    odd = [1, "s", None, [], {"prompt": "no lists"}, {"image_path": [], "rank": []}]
    for i in range(1, N_ROWS):
        u = rng.random()
        if u < 0.3:
            r = valid_record(i)
            k = len(r.get("rank") or r.get("human_preference"))
            valid[f"valid {i}"] = k * (k - 1) // 2
        elif u < 0.4:
            r = odd[rng.integers(len(odd))]
        else:
            r = valid_record(i)
            r["prompt"] = f"junk {i}"
            key = "rank" if "rank" in r else "human_preference"
            img_key = "image_path" if "image_path" in r else "file_path"
            for _ in range(int(rng.integers(1, 3))):
                what = rng.integers(5)
                if what == 0:
                    r["prompt"] = BAD_PROMPTS[rng.integers(len(BAD_PROMPTS))]
                elif what == 1:
                    r[img_key][rng.integers(len(r[img_key]))] = bad_paths[
                        rng.integers(len(bad_paths))]
                elif what == 2:
                    r[key][rng.integers(len(r[key]))] = BAD_LABELS[rng.integers(len(BAD_LABELS))]
                elif what == 3:
                    r[key] = r[key][:-1]
                else:
                    r[key][0] = 10 ** 400 if rng.random() < 0.5 else -(10 ** 400)
        records.append(r)
    path = root / "fuzz.json"
    path.write_text(json.dumps(records))   # NaN / Infinity written as such, as json allows
    rec = _util.OpenRecorder().install(monkeypatch)
    pairs, prompts, report = _run("hpdv2", path, tmp_path / "w")
    sk = _check(report, prompts, valid, root, sentinel, rec, pairs)
    assert sk["bad_record"] > 0 and sk["outside_root"] > 0 and sk["empty_prompt"] > 0


def test_fuzz_pickapic(tmp_path):
    rng = np.random.default_rng(16)
    import pyarrow as pa
    bad_caps = [None, b"", b"  ", b"\x00", b"\x1b\x07", b"caf\xe9", b"\xff\xfe", b"\xe2\x80\x8b",
                bytes(rng.integers(0, 256, 30, dtype=np.uint8))]
    bad_labels = [None, float("nan"), float("inf"), -1.0, 2.0, 0.3, 0.5]
    rows, valid = [], {}
    for i in range(N_ROWS):
        a, b = rng.choice(len(GOOD), 2, replace=False)
        label = float(rng.integers(0, 2))
        row = {"caption": f"valid {i}".encode(), "jpg_0": GOOD[a], "jpg_1": GOOD[b],
               "label_0": label, "label_1": 1.0 - label, "model_0": b"m", "model_1": b"n"}
        if rng.random() < 0.3:
            valid[f"valid {i}"] = 1
        else:
            row["caption"] = f"junk {i}".encode()
            for _ in range(int(rng.integers(1, 4))):
                what = rng.integers(6)
                if what == 0:
                    row["caption"] = bad_caps[rng.integers(len(bad_caps))]
                elif what in (1, 2):
                    row[f"jpg_{what - 1}"] = BAD_BYTES[rng.integers(len(BAD_BYTES))]
                elif what == 3:
                    row["label_0"] = bad_labels[rng.integers(len(bad_labels))]
                elif what == 4:
                    row["label_1"] = bad_labels[rng.integers(len(bad_labels))]
                else:
                    row["model_0"] = b"\xc3" if rng.random() < 0.5 else None
            if rng.random() < 0.1:
                row["jpg_1"] = row["jpg_0"]
        rows.append(row)
    shard = _util.write_shard(tmp_path / "fuzz.parquet", rows, row_group_size=41,
                              types={"caption": pa.binary(), "model_0": pa.binary(),
                                     "model_1": pa.binary()})
    pairs, prompts, report = _run("pickapic", shard, tmp_path / "w")
    assert report["rows_read"] == N_ROWS and report["accounted"]
    assert report["rows_read"] == (report["pairs_kept"] + sum(report["skipped"].values())
                                   + report["ties_dropped"])
    kept = {p["text"]: p["n_pairs"] for p in prompts}
    assert all(kept.get(t) == 1 for t in valid)
    sk = report["skipped"]
    for reason in ("missing_image", "image_too_large", "undecodable_image", "bad_encoding",
                   "empty_prompt", "bad_label", "same_image"):
        assert sk[reason] > 0, reason
