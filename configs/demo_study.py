"""The paper's claim in miniature on the demo world: which data should DPO train on?

Command:
    python -m fifa_jax.main --config configs/demo_study.py --workdir /tmp/fifa_study

With the same budget of DPO steps (study.num_steps) and the same base model, it trains on the
pairs chosen by FiFA importance top-K, FiFA greedy, random K, margin-only top-K and the full
dataset, 5 seeds each (study.methods, study.seeds), and measures on the demo world, whose true
reward is known: the true reward of samples (the pixel oracle, fifa_jax/demo/oracle.py) every
study.curve_every steps, the harm rate (the harmful mark on the samples, and on those of
harmful prompts),
implicit accuracy on held-out pairs no run trains on, and the train time to reach the
full-data run's final true reward. LoRA rows: a method "<method>+lora" trains adapters
(study.lora_rank, lora_alpha, lora_learning_rate) on that method's pairs, e.g.
--config.study.methods=importance,importance+lora; "<method>+smpo" trains with SmPO margin
weighting (train.margin_weighting=smpo), "+lora+smpo" both, "<method>+sft" supervised
fine-tuning on that selection's winners (train.loss=sft). Writes study/results.md (the table,
means with 95% intervals over the seeds and the study.eval_prompts prompts every run is
scored on, each method - base, and FiFA - random / full / margin paired by seed and prompt),
study/results.json and study/true_reward_vs_step.png (true reward and harm rate vs step).
Expected: 31.8 minutes on 2 CPU cores (2026-12-06, 5 seeds x 5 methods x 150 steps; the
README quotes the table and the plot, benchmarks/demo_study/ holds them).
"""
import os

import ml_collections

from fifa_jax.config_check import load_config_file
from fifa_jax.demo import study


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "demo.py"))
    config.stages = "ingest,score,study"
    config.select.method = "importance"     # each run sets its own method
    config.study = study.default_config()
    return config
