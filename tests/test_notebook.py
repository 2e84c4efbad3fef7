"""notebooks/demo.ipynb runs from top to bottom (nbclient, the repository as its working
directory) on a shortened demo: every stage, its plots and the report."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHORT = ("--config.data.demo.n_prompts=30 --config.data.demo.n_pairs=200 "
         "--config.data.demo.rows_per_shard=100 --config.select.k_pairs=24 "
         "--config.score.reward.batch_size=64 --config.encode.num_val_pairs=8 "
         "--config.train.num_steps=3 --config.train.eval_every=3 "
         "--config.evaluate.prompt_sets=demo:2 --config.evaluate.num_steps=2")


def test_demo_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FIFA_DEMO_WORKDIR", str(tmp_path / "w"))
    monkeypatch.setenv("FIFA_DEMO_EXTRA", SHORT)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR",
                       os.environ.get("FIFA_JAX_TEST_CACHE", str(ROOT / ".jax_cache")))
    nb = nbformat.read(ROOT / "notebooks" / "demo.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5        # margins, select plots, training curves, the grid
    assert (tmp_path / "w" / "evaluate" / "report" / "index.html").exists()
