"""TextToImage (text states, guided DDIM, VAE decode) equals diffusers' StableDiffusionPipeline
on the same tiny weights and start noise; the generate command writes its images."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from fifa_jax.sampling.pipeline import TextToImage, prompt_key, start_noise
from fifa_jax.demo.base import build_demo_base

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = ["two red circles at the top", "one blue square on the left"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_demo_base(str(tmp_path_factory.mktemp("demo_base") / "base"))


def test_matches_the_diffusers_pipeline(base):
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    with jax.default_matmul_precision("highest"):
        gen = TextToImage.load(base, sampler="ddim", num_steps=5, guidance_scale=7.5)
        ours = gen(PROMPTS, [0, 3])
    assert ours.shape == (2, 64, 64, 3) and ours.dtype == np.uint8
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    noise = start_noise(0, [prompt_key(p) for p in PROMPTS], [0, 3], gen.latent_shape)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=5, guidance_scale=7.5, output_type="np",
                   latents=torch.from_numpy(noise)).images
    ref = np.round(ref * 255).astype(np.int16)
    assert np.abs(ours.astype(np.int16) - ref).max() <= 1       # uint8 rounding at most
    assert ours.std() > 1                                       # not a blank image


def test_noise_depends_on_prompt_and_seed_only():
    a = start_noise(0, [5, 9, 5], [0, 0, 1], (4, 2, 2))
    b = start_noise(0, [9], [0], (4, 2, 2))
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.allclose(a[0], a[2]) and not np.allclose(a[0], a[1])


def test_generate_command(base, tmp_path):
    out = tmp_path / "images"
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", "fifa_jax.generate", "--model", base,
                           "--prompt", PROMPTS[0], "--num", "2", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / "prompts.json").read_text())
    assert sorted(index["images"]) == ["0000_0.png", "0000_1.png"]
    assert index["settings"]["guidance"] == 7.5
    from PIL import Image
    assert Image.open(out / "0000_1.png").size == (64, 64)
    proc = subprocess.run([sys.executable, "-m", "fifa_jax.generate", "--model", base,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "give --prompt" in proc.stderr


def _generate(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fifa_jax.generate", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, XLA_FLAGS=""))


@pytest.mark.parametrize("flags,message", [
    (["--num", "0"], "--num must be at least 1"),
    (["--num", "-2"], "--num must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance", "-1"], "--guidance must be in [0, 100]"),
    (["--size", "60"], "--size 60 is not a multiple of"),
])
def test_generate_refuses_bad_flags_in_one_line(base, tmp_path, flags, message):
    out = tmp_path / "images"
    proc = _generate("--model", base, "--prompt", "a red circle", "--out", str(out), *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_generate_size_and_cut_prompt_are_said(base, tmp_path):
    out = tmp_path / "images"
    long_prompt = " ".join(["a small red circle at the top"] * 60)
    proc = _generate("--model", base, "--prompt", long_prompt, "--prompt", "a blue square",
                     "--steps", "1", "--size", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note: prompt")]
    assert len(notes) == 1 and notes[0].startswith("note: prompt 0 ") and "cut" in notes[0]
    from PIL import Image
    assert Image.open(out / "0001_0.png").size == (32, 32)
    assert json.loads((out / "prompts.json").read_text())["settings"]["size"] == 32
