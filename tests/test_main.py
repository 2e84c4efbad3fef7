"""The command line: config errors are one line naming the key; unbuilt stages are refused."""
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIG = textwrap.dedent('''
    import ml_collections
    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.stages = arg or "ingest"
        c.select = ml_collections.ConfigDict({"k_pairs": 10, "alpha": 1.0})
        return c
''')


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.py"
    path.write_text(CONFIG)
    return str(path)


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "fifa_jax.main", *args],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("override,expected", [
    ("--config.select.foo=1", "unknown config key 'select.foo'"),
    ("--config.nope=1", "unknown config key 'nope'"),
    ("--config.select.k_pairs=abc", "bad value 'abc' for config key 'select.k_pairs'"),
    ("--config.select.alpha=x", "config key 'select.alpha'"),
])
def test_config_errors_are_one_line(config_file, tmp_path, override, expected):
    rc, out, err = _cli("--config", config_file, "--workdir", str(tmp_path), override)
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def test_unknown_key_lists_allowed_keys(config_file, tmp_path):
    _, _, err = _cli("--config", config_file, "--workdir", str(tmp_path), "--config.select.x=1")
    assert "alpha, k_pairs" in err


def test_missing_config_file(tmp_path):
    rc, _, err = _cli("--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path))
    assert rc == 2 and "does not exist" in err and "Traceback" not in err


def test_missing_upstream_stage_is_named(config_file, tmp_path):
    rc, _, err = _cli("--config", config_file + ":ingest,train", "--workdir", str(tmp_path))
    assert rc == 2 and "stage 'train' needs the output of stage 'encode'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("override,expected", [
    ("--config.select.method=gredy", "'select.method' must be one of importance, greedy"),
    ("--config.select.normalize=minmax", "'select.normalize' must be one of none, zscore"),
    ("--config.select.margin=relative", "'select.margin' must be one of absolute, signed"),
    ("--config.select.eps=0", "'select.eps'"),
    ("--config.select.k_pairs=0", "'select.k_pairs' must be >= 1"),
    ("--config.select.knn_tile=-1", "'select.knn_tile' must be >= 0"),
    ("--config.data.check_images=fast", "'data.check_images' must be one of decode, header, none"),
    ("--config.data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("--config.score.embedder.kind=sbert", "'score.embedder.kind' must be one of bert, clip"),
    ("--config.score.reward.dtype=bf16", "'score.reward.dtype' must be one of float32, bfloat16"),
    ("--config.score.judge.backend=vllm", "'score.judge.backend' must be one of jax, http"),
    ("--config.score.reward.batch_size=0", "'score.reward.batch_size' must be >= 1"),
    ("--config.mesh.distributed=yes", "'mesh.distributed' must be one of auto, on, off"),
    ("--config.mesh.data=0", "'mesh.data' must be -1 (the remaining devices) or >= 1"),
])
def test_bad_value_fails_before_any_stage_runs(tmp_path, override, expected):
    """A typo in a later section must not surface only after hours of ingest and scoring."""
    work = tmp_path / "w"
    rc, _, err = _cli("--config", str(ROOT / "configs" / "demo.py"), "--workdir", str(work),
                      override)
    lines = [line for line in err.strip().splitlines() if line]
    assert rc == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (work / "ingest").exists()
