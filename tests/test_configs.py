"""Every shipped config loads, names only built stages, and documents its command."""
import pathlib

import pytest

from fifa_jax import config_check, pipeline

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_runnable(path):
    config = config_check.load_config_file(str(path))
    pipeline.validate(config)
    pipeline.parse_stages(config.stages)
    doc = path.read_text().split('"""')[1]
    assert f"--config configs/{path.name}" in doc, "the docstring must give the command"


def test_demo_variants_pick_the_method():
    config = config_check.load_config_file(f"{CONFIG_DIR / 'demo.py'}:random")
    assert config.select.method == "random"
