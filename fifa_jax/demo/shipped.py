"""The demo's pretrained files shipped in the package (`fifa_jax/demo/models/<name>/`, made by
`python -m fifa_jax.demo.build_models`) and their installation into a work directory.

Files whose content is unchanged are not rewritten, so their mtimes (which key the stage
runner's fingerprints) stay put.
"""
from __future__ import annotations

import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def write_if_changed(path: str, data: bytes) -> None:
    """Write `data` to `path` (atomically) unless the file already holds exactly these bytes."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sync_tree(src: str, dst: str) -> None:
    """Copy every file under `src` to the same relative path under `dst`, writing only files
    whose bytes differ."""
    for root, _, files in sorted(os.walk(src)):
        rel = os.path.relpath(root, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                write_if_changed(os.path.normpath(os.path.join(dst, rel, name)), f.read())


def install(name: str, marker: str, folder) -> str:
    """Install the shipped `models/<name>/` into `folder` (created if absent); `marker` is a
    file that must be there (else the shipped models are missing). Returns the folder."""
    src = os.path.join(ROOT, name)
    if not os.path.exists(os.path.join(src, marker)):
        raise FileNotFoundError(f"the shipped demo {name} {src} is missing; rebuild it with "
                                f"`python -m fifa_jax.demo.build_models`")
    folder = str(folder)
    sync_tree(src, folder)
    return folder
