"""The evaluate stage's judge harm share: prompts the LLM judge marks harmful, over the
prompts it could rate (a ratings column as the judge)."""
import ml_collections
import numpy as np

from fifa_jax.evaluation import stage
from fifa_jax.scoring import judge


def test_share_of_prompts_the_judge_marks_harmful(tmp_path):
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("prompt,quality,harmful\na red circle,8,false\ngore,0,true\n"
                       "blue square,6,false\nblood,0,true\n")
    config = ml_collections.ConfigDict({"seed": 0, "score": {"judge": judge.default_config()},
                                        "evaluate": stage.default_config()})
    config.score.judge.backend = "column"
    config.score.judge.column.path = str(ratings)
    config.score.judge.column.missing = "fail"
    sets = {"s": {"prompts": [("0", "a red circle"), ("1", "gore"), ("2", "blue square"),
                              ("3", "blood"), ("4", "not in the file")]}}
    got = stage._judge_harm(config, sets, None, tmp_path)["s"]
    assert got["n"] == 4 and got["count"] == 2 and got["not_rated"] == 1
    assert np.isclose(got["rate"], 0.5) and got["ci"][0] <= 0.5 <= got["ci"][1]
