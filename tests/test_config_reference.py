"""configs/REFERENCE.md is what `python -m fifa_jax.config_reference` writes now; the check
fails on a stale file (mutations of the file and of a default); every key of every section of
the pipeline's configs has a row, with the comment of its source line."""
import subprocess
import sys

import pytest

from fifa_jax import config_reference as ref


@pytest.fixture(scope="module")
def text():
    return ref.render()


def test_reference_file_is_current(text):
    with open(ref.DEFAULT_OUT, encoding="utf-8") as f:
        committed = f.read()
    assert committed == text, ("configs/REFERENCE.md is stale: regenerate it with "
                               "`python -m fifa_jax.config_reference`")


def test_check_fails_on_a_stale_file(tmp_path, text):
    path = tmp_path / "REFERENCE.md"
    path.write_text(text)
    assert ref.is_current(str(path)) and ref.main(["--check", "--out", str(path)]) == 0
    path.write_text(text.replace("| `train.beta` | `5000.0` |", "| `train.beta` | `2500.0` |"))
    assert path.read_text() != text
    assert not ref.is_current(str(path)) and ref.main(["--check", "--out", str(path)]) == 1
    path.write_text(text + "\n")                              # trailing junk
    assert not ref.is_current(str(path))
    assert not ref.is_current(str(tmp_path / "missing.md"))


def test_check_fails_when_a_default_changes(tmp_path, text, monkeypatch):
    """A changed default in a default_config() (here: train.beta) makes the file stale."""
    from fifa_jax.training import train
    path = tmp_path / "REFERENCE.md"
    path.write_text(text)
    original = train.default_config

    def changed():
        c = original()
        c.beta = 2500.0
        return c
    changed.__wrapped__ = original          # inspect.getsource reads the original's comments
    monkeypatch.setattr(train, "default_config", changed)
    assert "| `train.beta` | `2500.0` | float |" in ref.render()
    assert not ref.is_current(str(path))


def test_every_key_of_every_section_has_a_row(text):
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    assert len(rows) > 150
    for name, module in ref.sections():
        for key, _ in ref._leaves(module.default_config()):
            assert f"{name}.{key}" in rows, f"{name}.{key} has no row"
    assert [s for s, _ in ref.sections()][:2] == ["mesh", "data"]
    for section in ("## `data.demo`", "## `score.judge`", "## `train`", "## `evaluate`"):
        assert section in text


def test_comments_come_from_the_source_lines(text):
    row = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert row["train.beta"].endswith("| official convention (diffusers' beta_dpo = beta / 2) |")
    # a comment continued on the next line, and a comment above a dict-literal key
    assert "symlinks; absolute ones too) outside image_root" in row["data.allow_outside_root"]
    assert row["mesh.param_tactic"].split("|")[-2].strip().startswith('"fsdp": each parameter')
    assert "\\| ipo \\| hinge" in row["train.loss"]          # '|' escaped in a table cell


def test_cli_check_runs():
    r = subprocess.run([sys.executable, "-m", "fifa_jax.config_reference", "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
