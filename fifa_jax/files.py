"""Cheap identities of input files (size and modification time), for fingerprints: a file
replaced or rewritten in place changes them without its contents being read."""
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
