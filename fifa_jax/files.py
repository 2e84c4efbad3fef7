"""Input files: cheap identities (size and modification time) for fingerprints, so a file
replaced or rewritten in place changes them without its contents being read; and JSON reads
whose decode errors name the file (`read_json`)."""
from __future__ import annotations

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
