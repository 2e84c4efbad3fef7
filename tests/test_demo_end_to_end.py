"""The README's first command on a small demo world: every built stage runs, a rerun skips them."""
import json

import pyarrow.parquet as pq
import pytest

from tests.cli import run_main

SMALL = ["--config.data.demo.n_prompts=40", "--config.data.demo.n_pairs=300",
         "--config.data.demo.rows_per_shard=150", "--config.select.k_pairs=30",
         "--config.score.reward.batch_size=64", "--config.score.reward.chunk_size=128",
         "--config.encode.num_val_pairs=16", "--config.train.num_steps=4",
         "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1", "--config.evaluate.prompt_sets=demo:4",
         "--config.evaluate.num_steps=4", "--config.evaluate.grid_prompts=3"]
STAGES = "['ingest', 'score', 'select', 'encode', 'train', 'export', 'evaluate']"


def _cli(workdir, *extra):
    return run_main("demo.py", workdir, *SMALL, *extra)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, _cli(workdir)


def test_demo_runs_every_built_stage(demo_run):
    workdir, out = demo_run
    assert f"ran {STAGES}" in out
    report = json.loads((workdir / "ingest" / "ingest_report.json").read_text())
    assert report["rows_read"] == 300
    manifest = pq.read_table(workdir / "select" / "manifest.parquet")
    assert manifest.num_rows == 30
    assert sorted((workdir / "select").glob("*.png"))
    for stage in ("ingest", "score", "select", "encode", "train", "export", "evaluate"):
        assert (workdir / stage / "STAGE_DONE.json").exists()
    records = [json.loads(line) for line in
               (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[0]["implicit_acc"] == 0.5
    for key in ("loss", "implicit_acc", "se_pol_w", "se_pol_l", "se_ref_w", "se_ref_l",
                "grad_norm", "learning_rate", "pairs_per_s"):
        assert all(r[key] is not None for r in train), key
    assert sorted(p.name for p in (workdir / "train" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2", "4"]
    assert list((workdir / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "export" / "export_report.json").read_text())["step"] == 4


def test_rerun_skips_finished_stages(demo_run):
    workdir, _ = demo_run
    before = (workdir / "select" / "manifest.parquet").read_bytes()
    out = _cli(workdir)
    assert f"ran nothing, skipped {STAGES}" in out
    assert out.count("skipped: finished at") == 7
    assert (workdir / "select" / "manifest.parquet").read_bytes() == before


def test_changed_selection_reruns_only_select(demo_run):
    workdir, _ = demo_run
    out = _cli(workdir, "--config.stages=select", "--config.select.method=random")
    assert "ran ['select']" in out
    out = _cli(workdir, "--config.stages=select,encode", "--config.select.method=random")
    assert "ran ['encode']" in out    # select: same settings, skipped; encode: new manifest
    manifest = pq.read_table(workdir / "select" / "manifest.parquet")
    assert set(manifest.column("method").to_pylist()) == {"random"}


def test_export_loads_in_diffusers_and_matches_the_checkpoint(demo_run):
    """The exported UNet is the trained step's parameters (not the base model's), loads in
    PyTorch diffusers and matches our Flax UNet; the pipeline folder generates an image."""
    import jax
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from flax import nnx

    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.unet_io import abstract_unet, load_unet
    from fifa_jax.training import checkpoints

    workdir, _ = demo_run
    export = workdir / "export"
    unet_dir = workdir / "encode" / "demo_base" / "unet"
    graphdef, abstract = nnx.split(abstract_unet(read_config(str(unet_dir))))
    params, step = checkpoints.restore_params(workdir / "train" / "checkpoints", None,
                                              nnx.to_pure_dict(abstract))
    assert step == 4
    ours = load_unet(str(export / "unet"))
    trained = nnx.merge(graphdef, params)
    base = load_unet(str(unet_dir))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(x, t, ctx))
        want = np.asarray(trained(x, t, ctx))
        from_base = np.asarray(base(x, t, ctx))
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - from_base).max() > 1e-6     # training moved the parameters
    torch_unet = UNet2DConditionModel.from_pretrained(str(export / "unet")).eval()
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x), torch.from_numpy(t),
                         encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    pipe = DiffusionPipeline.from_pretrained(str(export / "pipeline"))
    image = pipe("two red circles at the top", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_demo_report_opens_in_chromium(demo_run, tmp_path):
    """The evaluate stage's report: every number from the run, every image loads in a real
    browser (a screenshot of it is not blank)."""
    import numpy as np
    from PIL import Image

    from tests.browser import browser_path, chrome, image_counts
    workdir, out = demo_run
    summary = json.loads((workdir / "evaluate" / "summary.json").read_text())
    demo = summary["sets"]["demo"]
    assert demo["n_prompts"] == 4 and demo["images_per_model"] == 8
    pick = demo["metrics"]["pickscore"]
    assert pick["n"] == 8 and 0 <= pick["win_rate"] <= 1
    assert pick["win_rate_ci"][0] <= pick["win_rate"] <= pick["win_rate_ci"][1]
    assert summary["not_configured"] == ["clip_score", "aesthetic", "hpsv2", "image_reward",
                                         "nsfw"]
    truth = demo["metrics"]["true_reward"]       # the demo world's oracle, from pixels
    assert truth["n"] == 8 and -1.0 <= truth["base_mean"] <= 4.0
    assert "true_reward" in summary["scorers"] and "oracle_aesthetic" in summary["scorers"]
    noise = demo["metrics"]["oracle_aesthetic"]  # the true reward's pixel-noise term
    assert noise["n"] == 8 and 0.0 <= noise["base_mean"] <= 1.0
    follow = demo["following"]                   # per asked attribute, base vs tuned
    assert follow and set(follow) <= {"colour", "position", "shape", "count"}
    for f in follow.values():
        assert 0 < f["base"]["n"] == f["tuned"]["n"] <= 8
        assert f["mean_diff"] == pytest.approx(f["tuned"]["rate"] - f["base"]["rate"])
    harm = demo["harm"]                          # the mark on any image (the world leaks it)
    assert harm["base"]["n"] == harm["tuned"]["n"] == 8
    assert harm["mean_diff"] == pytest.approx(harm["tuned"]["rate"] - harm["base"]["rate"])
    assert "Prompt following" in (workdir / "evaluate" / "report" / "index.html").read_text()
    assert len(list((workdir / "evaluate" / "images" / "demo" / "tuned").glob("*.png"))) == 8
    index = workdir / "evaluate" / "report" / "index.html"
    assert f"{index}" in out                  # the run says where the report is
    browser = browser_path()
    n_loaded, broken = image_counts(browser, tmp_path / "p1", f"file://{index}")
    assert broken == 0 and n_loaded >= 3 * 2 * 2 + 2   # 3 prompts x 2 seeds x 2 models + plots
    shot = tmp_path / "shot.png"
    chrome(browser, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1280,1600",
           f"file://{index}")
    assert np.asarray(Image.open(shot).convert("RGB"), np.float64).std() > 20


def test_training_sees_the_text_states_the_sampler_makes(demo_run):
    """Each encoded train pair points at its own prompt's text states, and those (and the
    empty prompt's, for caption dropout) equal what the sampler computes for the same text:
    the trained UNet is conditioned as it is at sampling time."""
    import numpy as np

    from fifa_jax.demo import assets
    from fifa_jax.sampling.pipeline import TextToImage
    from fifa_jax.training import pair_dataset as pds
    workdir, _ = demo_run
    enc = workdir / "encode"
    pairs = pds.data_source(enc, "pairs", "train")
    prompts = pds.data_source(enc, "prompts", "prompts")
    ingest = pq.read_table(workdir / "ingest" / "pairs.parquet", columns=["pair_id", "prompt_id"])
    prompt_of = dict(zip(ingest.column("pair_id").to_pylist(),
                         ingest.column("prompt_id").to_pylist()))
    texts = pq.read_table(workdir / "ingest" / "prompts.parquet", columns=["prompt_id", "text"])
    text_of = dict(zip(texts.column("prompt_id").to_pylist(), texts.column("text").to_pylist()))
    rows = [pairs[i] for i in range(5)]
    for r in rows:
        assert int(prompts[int(r["prompt_row"])]["prompt_id"]) == prompt_of[int(r["pair_id"])]
    gen = TextToImage.load(assets.resolve_base_model("demo", workdir))
    wanted = [text_of[prompt_of[int(r["pair_id"])]] for r in rows] + [""]
    states = np.asarray(gen.text_states(wanted)["prompt_embeds"])
    stored = [prompts[int(r["prompt_row"])]["prompt_embeds"] for r in rows]
    stored.append(pds.load_empty_prompt(enc)["prompt_embeds"])
    np.testing.assert_array_equal(np.stack(stored).astype(np.float32), states)
