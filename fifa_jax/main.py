"""Command line: `python -m fifa_jax.main --config configs/<name>.py[:arg] --workdir DIR
[--config.key=value ...] [--force=stage,...]`.

Parses flags, sets up logging and devices, then hands the config to the stage runner
(`fifa_jax.pipeline`). Configuration mistakes end with one line naming the key, not a traceback.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fifa_jax import config_check, pipeline
from fifa_jax.errors import ConfigError, InputError, Interrupted

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py (optionally :arg).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for every stage's outputs.")
_FORCE = flags.DEFINE_list("force", [], "Stages to rerun even if finished with the same config.")


def _run(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config configs/demo.py", file=sys.stderr)
        return 2
    if not _WORKDIR.value:
        print("error: --workdir is required, e.g. --workdir /tmp/fifa_demo", file=sys.stderr)
        return 2
    try:
        pipeline.validate(config)
        results = pipeline.run_pipeline(config, _WORKDIR.value, force=_FORCE.value)
    except (pipeline.PipelineError, ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:            # progress saved: the same command resumes
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + int(e.signum)
    ran = [k for k, v in results.items() if v["status"] == "ran"]
    skipped = [k for k, v in results.items() if v["status"] == "skipped"]
    print(f"finished: ran {ran or 'nothing'}, skipped {skipped or 'nothing'}; "
          f"outputs in {_WORKDIR.value}")
    for name, record in results.items():
        report = (record.get("summary") or {}).get("report")
        if report:
            print(f"{name} report: {report}")
    return 0


def _quiet_libraries(record) -> bool:
    """Drop the INFO chatter of Orbax's asynchronous saves (it would bury the progress
    bar); its warnings and errors stay."""
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def main() -> None:
    """Entry point; config-flag errors become one line naming the key."""
    argv = config_check.parse_flags_or_exit(sys.argv)
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    sys.exit(_run(argv))


if __name__ == "__main__":
    main()
