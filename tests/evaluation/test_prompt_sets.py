"""prompt_sets: each reader on small files written here, skip counts, one-line errors."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fifa_jax.errors import InputError
from fifa_jax.evaluation.prompt_sets import HPSV2_STYLES, load_prompt_set


def test_text(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"\xef\xbb\xbfa cat\n# comment\n\n  a dog  \na cat\n\xff\xfe bad\n\t\x00\n"
                  b"   # indented comment\nlast")
    s = load_prompt_set("text", p)
    assert s.prompts == [("line-1", "a cat"), ("line-4", "a dog"), ("line-9", "last")]
    assert s.skipped == {"empty": 1, "duplicate": 1, "undecodable": 1}
    assert any("line 6: undecodable" in e for e in s.examples)
    assert "3 prompts" in s.summary() and "1 duplicate" in s.summary()
    assert [t for _, t in load_prompt_set("text", p, limit=2).prompts] == ["a cat", "a dog"]


def test_partiprompts(tmp_path):
    p = tmp_path / "PartiPrompts.tsv"
    rows = ["Prompt\tCategory\tChallenge\tNote",
            "bond\tAbstract\tBasic\tBiology-inspired",
            'A robot graffiti. The words "Fly an airplane" are written\tOutdoor Scenes\tComplex\t',
            "bond\tAbstract\tBasic\t",
            "\tAbstract\tBasic\t",
            "short row"]
    p.write_bytes(("\n".join(rows) + "\n").encode() + b"caf\xe9\tFood\tBasic\t\n\n")
    s = load_prompt_set("partiprompts", p)
    assert s.prompts == [("row-0", "bond"),
                         ("row-1", 'A robot graffiti. The words "Fly an airplane" are written'),
                         ("row-4", "short row")]
    assert s.metadata["row-1"] == {"category": "Outdoor Scenes", "challenge": "Complex"}
    assert s.metadata["row-4"] == {"category": "", "challenge": ""}
    assert s.skipped == {"empty": 1, "duplicate": 1, "undecodable": 1}
    assert any("row 5 (line 7): undecodable" in e for e in s.examples)
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(InputError, match=r"bad.tsv: PartiPrompts TSV header has no 'Prompt'"):
        load_prompt_set("partiprompts", bad)


def test_hpsv2_folder_interleaved_and_single_file(tmp_path):
    for k, style in enumerate(HPSV2_STYLES):
        items = [f"{style} {i}" for i in range(3 + k)]
        if style == "photo":
            items += ["anime 0", "", 7, None]   # duplicate, empty, not text, null
        (tmp_path / f"{style}.json").write_text(json.dumps(items))
    s = load_prompt_set("hpsv2", tmp_path)
    assert s.prompts[:5] == [("anime-0", "anime 0"), ("concept-art-0", "concept-art 0"),
                             ("paintings-0", "paintings 0"), ("photo-0", "photo 0"),
                             ("anime-1", "anime 1")]
    assert len(s.prompts) == 3 + 4 + 5 + 6
    assert s.skipped == {"empty": 2, "duplicate": 1, "undecodable": 1}
    assert s.metadata["paintings-4"] == {"style": "paintings"}
    four = load_prompt_set("hpsv2", tmp_path, limit=4)
    assert sorted(m["style"] for m in four.metadata.values()) == sorted(HPSV2_STYLES)
    one = load_prompt_set("hpsv2", tmp_path / "anime.json")
    assert one.prompts == [("anime-0", "anime 0"), ("anime-1", "anime 1"), ("anime-2", "anime 2")]
    (tmp_path / "photo.json").unlink()
    with pytest.raises(InputError, match="lacks photo.json"):
        load_prompt_set("hpsv2", tmp_path)
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match="x.json: HPSv2 prompt file must hold a JSON list"):
        load_prompt_set("hpsv2", tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1,")
    with pytest.raises(InputError, match="y.json: not a UTF-8 JSON file"):
        load_prompt_set("hpsv2", tmp_path / "y.json")


def test_pickapic_parquet_file_and_folder(tmp_path):
    caps = pa.array([b"a red fox", b"a red fox", None, b"  ", b"\xff\xfeoops", b"a blue whale"],
                    pa.binary())
    table = pa.table({"caption": caps, "best_image_uid": pa.array(list("abcdef"))})
    pq.write_table(table, tmp_path / "test_unique-00000.parquet")
    s = load_prompt_set("pickapic", tmp_path / "test_unique-00000.parquet")
    assert s.prompts == [("row-0", "a red fox"), ("row-5", "a blue whale")]
    assert s.skipped == {"empty": 2, "duplicate": 1, "undecodable": 1}
    pq.write_table(pa.table({"caption": pa.array(["a green frog", "a red fox"])}),
                   tmp_path / "test_unique-00001.parquet")
    folder = load_prompt_set("pickapic", tmp_path)
    assert folder.prompts[-1] == ("row-6", "a green frog")
    assert folder.skipped["duplicate"] == 2
    assert load_prompt_set("pickapic", tmp_path, limit=1).prompts == [("row-0", "a red fox")]
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match=r"other.parquet: parquet has no 'caption' column"):
        load_prompt_set("pickapic", tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="junk.parquet: not a readable parquet file"):
        load_prompt_set("pickapic", tmp_path / "junk.parquet")


def test_errors(tmp_path):
    with pytest.raises(InputError, match="kind must be one of"):
        load_prompt_set("coco", tmp_path)
    with pytest.raises(InputError, match="nope.txt: no such prompt file"):
        load_prompt_set("text", tmp_path / "nope.txt")
    (tmp_path / "only_comments.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no usable prompts"):
        load_prompt_set("text", tmp_path / "only_comments.txt")
    with pytest.raises(InputError, match="limit must be >= 0"):
        load_prompt_set("text", tmp_path / "only_comments.txt", limit=-1)
