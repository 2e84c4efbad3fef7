"""encode.resolution is checked against the base model's UNet and VAE config files before any
stage runs: the demo's base at 60 px (15 x 15 latents) and an SD-layout folder at 520 px are
refused in one line naming the key and the sizes that work; the CLI exits 2 having written
nothing."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fifa_jax import pipeline
from fifa_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(path="configs/demo.py"):
    from fifa_jax.config_check import load_config_file
    return load_config_file(str(ROOT / path))


def test_demo_base_refuses_60_and_takes_64():
    config = _config()
    pipeline.validate(config)                       # the shipped 64
    config.encode.resolution = 60
    with pytest.raises(ConfigError, match=r"'encode.resolution' = 60 does not fit the base "
                                          r"model: .* 15 x 15 latents\); use 56 or 64"):
        pipeline.validate(config)


def test_sd_layout_folder_from_its_config_files(tmp_path):
    for sub, levels in (("unet", 4), ("vae", 4)):
        os.makedirs(tmp_path / sub)
        (tmp_path / sub / "config.json").write_text(
            json.dumps({"block_out_channels": [8] * levels}))
    config = _config()
    config.encode.base_model = str(tmp_path)
    config.encode.resolution = 512
    pipeline.validate(config)
    config.encode.resolution = 520
    with pytest.raises(ConfigError, match=r"multiple of 64 \(520 gives 65 x 65 latents\); "
                                          r"use 512 or 576"):
        pipeline.validate(config)
    config.stages = "ingest,score,select"           # no stage that needs the size
    pipeline.validate(config)


def test_cli_stops_before_any_stage(tmp_path):
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-m", "fifa_jax.main", "--config",
                           str(ROOT / "configs" / "demo.py"), "--workdir", str(workdir),
                           "--config.encode.resolution=60"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "encode.resolution" in errors[0], proc.stderr[-2000:]
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("vae, unet, size, factor, multiple, near", [
    (4, 4, 520, 8, 64, (512, 576)),     # SD1.5 / SDXL layouts
    (3, 2, 60, 4, 8, (56, 64)),         # the demo: 60 px is 15 x 15 latents
    (4, 3, 20, 8, 32, (32, 32)),        # below one multiple: the first multiple, twice
])
def test_size_multiple_is_the_vae_factor_times_the_unet_downsampling(vae, unet, size, factor,
                                                                     multiple, near):
    from fifa_jax.training import resolution
    assert resolution.size_multiple(vae, unet) == (factor, multiple)
    assert resolution.neighbours(size, multiple) == near
