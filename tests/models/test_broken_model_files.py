"""Broken model files are one line naming the file: a config.json that is not JSON, a
safetensors file cut short or not safetensors at all, a broken tokenizer file, a broken
scheduler config; through `generate` they end with exit code 2 and no traceback."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fifa_jax.errors import InputError
from fifa_jax.models.diffusers_io import read_config
from fifa_jax.models.safetensors_io import (LazySafetensors, read_safetensors,
                                            write_safetensors)
from fifa_jax.models.tokenizers import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_BASE = ROOT / "fifa_jax" / "demo" / "models" / "base"


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{"in_channels": 4,,}')
    with pytest.raises(InputError, match=rf"{tmp_path}/config.json \(a diffusers config\) is "
                                         r"not valid JSON: .* line 1 column"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="config.json .* is not UTF-8 text"):
        read_config(str(tmp_path))


@pytest.mark.parametrize("reader", [LazySafetensors, read_safetensors])
def test_truncated_or_foreign_safetensors(tmp_path, reader):
    path = tmp_path / "model.safetensors"
    write_safetensors({"w": np.arange(1000, dtype=np.float32)}, str(path))
    assert reader(str(path))["w"].shape == (1000,)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(InputError, match=rf"{path}: truncated: its tensors need {len(data)} "
                                         rf"bytes, the file has {len(data) - 100}"):
        reader(str(path))
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(InputError, match=rf"{path}: not a safetensors file"):
        reader(str(path))
    path.write_bytes(b"")
    with pytest.raises(InputError, match=rf"{path}: 0 bytes, too short"):
        reader(str(path))


def test_broken_tokenizer_file(tmp_path):
    tok = tmp_path / "tokenizer"
    shutil.copytree(SHIPPED_BASE / "tokenizer", tok)
    assert load_tokenizer(str(tok)) is not None
    broken = sorted(p for p in tok.iterdir() if p.suffix == ".json")[0]
    broken.write_text(broken.read_text()[:50])
    with pytest.raises(InputError, match=rf"{broken} \(a tokenizer file\) is not valid JSON"):
        load_tokenizer(str(tok))


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory):
    """A copy of the demo's shipped base pipeline (weights and all)."""
    dst = tmp_path_factory.mktemp("broken") / "base"
    shutil.copytree(SHIPPED_BASE, dst)
    return dst


@pytest.mark.parametrize("what", ["unet_config", "unet_weights", "scheduler"])
def test_generate_names_the_broken_file(base_copy, tmp_path, what):
    base = tmp_path / "base"
    shutil.copytree(base_copy, base)
    if what == "unet_config":
        broken = base / "unet" / "config.json"
        broken.write_text("not json")
    elif what == "unet_weights":
        broken = next((base / "unet").glob("*.safetensors"))
        with open(broken, "r+b") as f:
            f.truncate(broken.stat().st_size // 2)
    else:
        broken = base / "scheduler" / "scheduler_config.json"
        broken.write_text("{")
    proc = subprocess.run([sys.executable, "-m", "fifa_jax.generate", "--model", str(base),
                           "--prompt", "a red circle", "--steps", "1",
                           "--out", str(tmp_path / "images")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(broken) in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
