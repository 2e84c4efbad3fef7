"""Load tokenizers offline from a local folder, and refuse silently broken ones.

The trap (transformers 5): `CLIPTokenizer(vocab_file=..., merges_file=...)` - the 4.x keywords -
ignores both files and returns a tokenizer with only its 2-3 special tokens, which then maps
every prompt to the same few ids without any error. `check_vocab` compares the tokenizer's size
with the vocabulary file on disk (`vocab.json`, or the model vocab in `tokenizer.json`) and with
the text encoder's `vocab_size` when given.

    load_tokenizer(path, expected_vocab_size=None) -> transformers tokenizer
    load_clip_tokenizer(vocab_path, merges_path)   -> CLIPTokenizer from the two files
"""
from __future__ import annotations

import os
from typing import Optional

from fifa_jax.errors import InputError
from fifa_jax.files import read_json


class TokenizerVocabError(InputError):
    """A tokenizer whose vocabulary does not match the files it was loaded from."""


def _file_vocab_size(path: str) -> Optional[int]:
    """Entries in `path/vocab.json`, else in `path/tokenizer.json`'s model vocab, else None."""
    vocab_json = os.path.join(path, "vocab.json")
    if os.path.exists(vocab_json):
        return len(read_json(vocab_json, "a tokenizer vocabulary"))
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.exists(tok_json):
        vocab = (read_json(tok_json, "a tokenizer").get("model") or {}).get("vocab")
        if isinstance(vocab, (dict, list)):
            return len(vocab)
    return None


def check_vocab(tokenizer, source: str, *, file_vocab_size: Optional[int] = None,
                expected_vocab_size: Optional[int] = None) -> None:
    """Raise TokenizerVocabError if the tokenizer lost its vocabulary or exceeds the model's.

    Args:
      tokenizer: a transformers tokenizer.
      source: the folder or file it came from (named in the error).
      file_vocab_size: entries in the vocabulary file on disk; len(tokenizer) must reach it.
      expected_vocab_size: the text encoder's `vocab_size`; every id must be below it.
    """
    n = len(tokenizer)
    if file_vocab_size is not None and n < file_vocab_size:
        raise TokenizerVocabError(
            f"tokenizer from {source} has {n} tokens but its vocabulary file has "
            f"{file_vocab_size} entries (transformers 5 ignores the 4.x keywords vocab_file= / "
            f"merges_file=; pass vocab= / merges= or load the folder)")
    if n <= 3:
        raise TokenizerVocabError(f"tokenizer from {source} has only {n} tokens")
    if expected_vocab_size is not None and n > expected_vocab_size:
        raise TokenizerVocabError(
            f"tokenizer from {source} has {n} tokens, more than the text encoder's vocab_size "
            f"{expected_vocab_size}")


JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json")


def load_clip_tokenizer(vocab_path: str, merges_path: str, **kwargs):
    """A CLIPTokenizer from explicit `vocab.json` and `merges.txt` files, vocabulary checked."""
    from transformers import CLIPTokenizer
    for p in (vocab_path, merges_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"tokenizer file not found: {p}")
    tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, **kwargs)
    check_vocab(tok, vocab_path,
                file_vocab_size=len(read_json(vocab_path, "a tokenizer vocabulary")))
    return tok


def load_tokenizer(path: str, *, expected_vocab_size: Optional[int] = None):
    """A tokenizer from a local folder (no network), vocabulary checked.

    Uses `AutoTokenizer` when the folder has `tokenizer_config.json` or `tokenizer.json`, and
    falls back to `CLIPTokenizer` for a bare `vocab.json` + `merges.txt` folder.
    """
    from transformers import AutoTokenizer, CLIPTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    has = lambda name: os.path.exists(os.path.join(path, name))
    for name in JSON_FILES:       # a broken JSON file: one line naming it
        if has(name):
            read_json(os.path.join(path, name), "a tokenizer file")
    tok, err = None, None
    if has("tokenizer_config.json") or has("tokenizer.json"):
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (ValueError, OSError, TypeError) as e:  # e.g. no tokenizer class resolvable
            err = e
    if tok is None and has("vocab.json") and has("merges.txt"):
        try:
            tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 (a broken merges.txt: named below)
            err = e
    if tok is None:
        why = (f"{type(err).__name__}: {str(err).splitlines()[0][:300]}" if err else
               "no tokenizer_config.json, tokenizer.json or vocab.json + merges.txt")
        raise InputError(f"cannot load a tokenizer from {path}: {why}")
    check_vocab(tok, path, file_vocab_size=_file_vocab_size(path),
                expected_vocab_size=expected_vocab_size)
    return tok
