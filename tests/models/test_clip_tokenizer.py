"""Offline tokenizer loading from a tiny CLIP vocab + merges written here, and the
transformers-5 `vocab_file=` trap detected."""
import json

import pytest
from transformers import CLIPTokenizer

from fifa_jax.models.tokenizers import (TokenizerVocabError, check_vocab, load_clip_tokenizer,
                                        load_tokenizer)


def write_tiny_clip_tokenizer(folder):
    """vocab.json (57 entries) + merges.txt; "a cat" -> [bos, a</w>, cat</w>, eos]."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = ["a b", "c a", "ca t</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def test_load_clip_tokenizer_from_files(tmp_path):
    vocab = write_tiny_clip_tokenizer(tmp_path / "tok")
    tok = load_clip_tokenizer(str(tmp_path / "tok" / "vocab.json"),
                              str(tmp_path / "tok" / "merges.txt"))
    assert len(tok) == len(vocab) == 57
    assert tok("a cat").input_ids == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["cat</w>"],
                                      vocab["<|endoftext|>"]]


def test_load_tokenizer_bare_folder_and_saved_folder(tmp_path):
    vocab = write_tiny_clip_tokenizer(tmp_path / "bare")
    bare = load_tokenizer(str(tmp_path / "bare"))
    ids = bare("a cat").input_ids
    assert ids[1:3] == [vocab["a</w>"], vocab["cat</w>"]]
    bare.save_pretrained(str(tmp_path / "saved"))          # tokenizer.json + tokenizer_config
    saved = load_tokenizer(str(tmp_path / "saved"), expected_vocab_size=57)
    assert saved("a cat").input_ids == ids


def test_vocab_file_keyword_trap_is_detected(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tok")
    trap = CLIPTokenizer(vocab_file=str(tmp_path / "tok" / "vocab.json"),
                         merges_file=str(tmp_path / "tok" / "merges.txt"))
    assert len(trap) <= 3                                   # the silent failure itself
    with pytest.raises(TokenizerVocabError, match="vocab_file"):
        check_vocab(trap, str(tmp_path / "tok"), file_vocab_size=57)
    with pytest.raises(TokenizerVocabError, match="only"):
        check_vocab(trap, "trap")


def test_tokenizer_larger_than_text_encoder_vocab_fails(tmp_path):
    write_tiny_clip_tokenizer(tmp_path / "tok")
    with pytest.raises(TokenizerVocabError, match="vocab_size 50"):
        load_tokenizer(str(tmp_path / "tok"), expected_vocab_size=50)


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))
