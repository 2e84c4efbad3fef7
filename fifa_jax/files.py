"""Input files: cheap identities (size and modification time) for fingerprints, so a file
replaced or rewritten in place changes them without its contents being read; a content
digest of a model folder (`checkpoint_signature`); and JSON reads whose decode errors name
the file (`read_json`)."""
from __future__ import annotations

import hashlib
import os


def file_stats(path: str) -> dict:
    """{file: [size, mtime_ns]} of a file, or of every file under a folder (sorted walk);
    {path: "missing"} when nothing is there."""
    if os.path.isfile(path):
        st = os.stat(path)
        return {path: [st.st_size, st.st_mtime_ns]}
    if not os.path.isdir(path):
        return {path: "missing"}
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = [st.st_size, st.st_mtime_ns]
    return out


def read_json(path, what: str = "") -> object:
    """The JSON value in file `path`; a file that is not JSON (or not text) is an InputError
    naming the file, the position and, when given, `what` the file should be."""
    import json

    from fifa_jax.errors import InputError
    kind = f" ({what})" if what else ""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}{kind} is not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}{kind} is not UTF-8 text (byte {e.start}): not a JSON "
                         f"file") from e
    except IsADirectoryError as e:
        raise InputError(f"{path}{kind} is a folder, not a JSON file") from e


_SIG_SMALL = 1 << 20        # files up to this size are hashed whole
_SIG_SAMPLES, _SIG_BLOCK = 64, 1 << 14


def checkpoint_signature(path: str) -> str:
    """Content digest of a model folder (weights, config, tokenizer, chat template): new
    files at the same path are a different model (the jax judge's cache keys, the demo
    world made from the demo base's samples). Small files are hashed whole, large
    ones by size and 64 evenly spaced 16 KiB blocks (about 1 MiB read per weight file). No
    mtimes, so identical copies on several hosts give the same cache keys."""
    h = hashlib.sha256()
    real = os.path.realpath(path)
    for root, dirs, files in os.walk(real):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # e.g. .cache/huggingface
        for f in sorted(files):
            if f.startswith((".", "judge_cache.sqlite3")):  # a cache_dir inside the folder
                continue
            full = os.path.join(root, f)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, real)}:{size}\0".encode())
            with open(full, "rb") as fh:
                if size <= _SIG_SMALL:
                    h.update(fh.read())
                    continue
                for k in range(_SIG_SAMPLES):
                    fh.seek((size - _SIG_BLOCK) * k // (_SIG_SAMPLES - 1))
                    h.update(fh.read(_SIG_BLOCK))
    return h.hexdigest()
