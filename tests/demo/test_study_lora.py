"""The study's LoRA rows: a method named "<method>+lora" selects with <method> and trains
LoRA adapters (study.lora_*); its curve restores the adapters and merges them into the base."""
import json

import pytest

from fifa_jax.demo import study
from fifa_jax.config_check import load_config_file
from tests.cli import ROOT, run_main
from tests.demo.test_study_end_to_end import SMALL


def test_lora_method_sets_the_selection_and_the_adapters():
    config = load_config_file(str(ROOT / "configs" / "demo_study.py"))
    cfg = study._sub_config(config, "greedy+lora", 3, "select,encode,train")
    assert cfg.select.method == "greedy" and cfg.seed == 3
    assert cfg.train.lora.rank == config.study.lora_rank > 0
    assert cfg.train.lora.alpha == config.study.lora_alpha
    assert cfg.train.learning_rate == config.study.lora_learning_rate
    plain = study._sub_config(config, "greedy", 3, "select,encode,train")
    assert plain.train.lora.rank == 0 and plain.train.learning_rate == config.train.learning_rate


@pytest.mark.slow
def test_study_with_a_lora_row(tmp_path):
    args = [a for a in SMALL if not a.startswith(("--config.study.methods",
                                                  "--config.study.seeds"))]
    run_main("demo_study.py", tmp_path, *args, "--config.study.methods=importance+lora",
             "--config.study.seeds=0")
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    row = results["methods"]["importance+lora"]
    assert row["pairs"] == 12
    rec = json.loads((tmp_path / "study" / "runs" / "importance+lora_s0" / "curve.json")
                     .read_text())
    assert [p["step"] for p in rec["curve"]] == [0, 1, 2]
    assert 0.0 <= rec["final"]["heldout_implicit_acc"] <= 1.0
    assert "| importance+lora | 12 |" in (tmp_path / "study" / "results.md").read_text()


def test_smpo_and_combined_variants():
    from fifa_jax.errors import ConfigError
    config = load_config_file(str(ROOT / "configs" / "demo_study.py"))
    cfg = study._sub_config(config, "importance+smpo", 0, "select,encode,train")
    assert cfg.select.method == "importance" and cfg.train.margin_weighting == "smpo"
    assert cfg.train.lora.rank == 0
    both = study._sub_config(config, "margin+lora+smpo", 0, "select,encode,train")
    assert both.select.method == "margin" and both.train.margin_weighting == "smpo"
    assert both.train.lora.rank == config.study.lora_rank
    assert study._sub_config(config, "random", 0, "train").train.margin_weighting == "none"
    with pytest.raises(ConfigError, match=r"'greedy\+dora' names unknown variant"):
        study._sub_config(config, "greedy+dora", 0, "train")


def test_sft_variant_trains_the_winners_alone():
    from fifa_jax.errors import ConfigError
    config = load_config_file(str(ROOT / "configs" / "demo_study.py"))
    cfg = study._sub_config(config, "greedy+sft", 0, "select,encode,train")
    assert cfg.select.method == "greedy" and cfg.train.loss == "sft"
    assert study._sub_config(config, "greedy+lora+sft", 0, "train").train.lora.rank > 0
    with pytest.raises(ConfigError, match="study.methods.*takes no \\+smpo"):
        study._sub_config(config, "greedy+sft+smpo", 0, "train")
