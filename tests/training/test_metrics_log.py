"""metrics.jsonl on restart: a run restarted before its first checkpoint rewrites everything
(the step-0 evaluation appears once); a run resumed at step s keeps steps <= s and rewrites
the rest; TensorBoard hides exactly the steps that are written again."""
import json

from fifa_jax.training.metrics import MetricWriter


def _records(path):
    return [(r["step"], r["kind"]) for r in map(json.loads, path.read_text().splitlines())]


def test_restart_before_the_first_checkpoint_writes_step_0_once(tmp_path):
    w = MetricWriter(tmp_path, resume_step=0)
    w.write(0, {"loss": 0.7}, kind="eval")
    w.write(1, {"loss": 0.6})
    w.close()
    w = MetricWriter(tmp_path, resume_step=0)          # killed before any checkpoint
    assert w._tb.purge_step == 0
    w.write(0, {"loss": 0.7}, kind="eval")
    w.close()
    assert _records(tmp_path / "metrics.jsonl") == [(0, "eval")]


def test_resume_keeps_steps_up_to_the_checkpoint(tmp_path):
    w = MetricWriter(tmp_path, resume_step=0)
    w.write(0, {"loss": 0.7}, kind="eval")
    for s in range(1, 6):
        w.write(s, {"loss": 0.1 * s})
    w.close()
    w = MetricWriter(tmp_path, resume_step=3)
    assert w._tb.purge_step == 4                        # step 3 is not written again
    w.write(4, {"loss": 0.0})
    w.close()
    assert _records(tmp_path / "metrics.jsonl") == [(0, "eval"), (1, "train"), (2, "train"),
                                                    (3, "train"), (4, "train")]
