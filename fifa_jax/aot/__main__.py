"""`python -m fifa_jax.aot --config CONFIG --topology v5e:4x4 [--num_slices N] [--json FILE]
[--hbm_gib G] [--knn_rows N] [--programs a,b] [--no_msa] [--config.key=value ...]`

Prints a table (one row a program: per-chip GiB against HBM, XLA's TFLOP a chip and estimated
seconds, collective counts); a program that does not compile or does not fit ends in one
`error:` line naming it, the bytes needed and available and the settings to change, and the
exit code is 1. Config mistakes: one line, exit code 2. Every figure is a compiler estimate.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from fifa_jax import config_check
from fifa_jax.errors import ConfigError, InputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/pickapic_sd15.py:ROOT.",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology (v5e:4x4, v5p:2x2x1) or slice "
                                "name (v5e-16, v5p-8, v6e-8).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology (multi-slice).")
_JSON = flags.DEFINE_string("json", None, "Write the results here (a JSON list).")
_HBM = flags.DEFINE_float("hbm_gib", None, "HBM a chip in GiB instead of the chip's own.")
_KNN_ROWS = flags.DEFINE_integer("knn_rows", None, "Rows of the k-NN (default: Pick-a-Pic's "
                                 "unique prompts, 58,960).")
_PROGRAMS = flags.DEFINE_list("programs", [], "Only these programs (e.g. train_step,sample).")
_NO_MSA = flags.DEFINE_bool("no_msa", False, "Compile without libtpu's memory-space "
                            "assignment: far less compile time and host memory for SD-size "
                            "programs; HBM then within a few percent of the full compile's, "
                            "not a bound (SD1.5 v5e-8 micro-step: 4.6% below), and the time "
                            "estimate that of an unplaced program (a memory check).")


def _save_json(results: list[dict]) -> None:
    """Write --json (after each program: a check cut short keeps what it finished)."""
    from fifa_jax.aot import save_json
    save_json(results, _JSON.value)


def _run(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None or not _TOPOLOGY.value:
        print("error: --config and --topology are required, e.g. --config "
              "configs/pickapic_sd15.py:ROOT --topology v5e-8", file=sys.stderr)
        return 2
    from fifa_jax import aot, pipeline
    from fifa_jax.aot.topology import TopologyError, disable_msa
    if _NO_MSA.value:
        disable_msa()
    try:
        pipeline.validate(config)
        print(f"compiling for {_TOPOLOGY.value}"
              f"{f' x {_SLICES.value} slices' if _SLICES.value > 1 else ''} "
              f"(compile-only devices; every figure is a compiler estimate"
              f"{'; no memory-space assignment: HBM near, not a bound' if _NO_MSA.value else ''})",
              flush=True)
        print(aot.table_header(), flush=True)
        results = aot.run_check(config, _TOPOLOGY.value, num_slices=_SLICES.value,
                                hbm_gib=_HBM.value, knn_rows=_KNN_ROWS.value,
                                only=tuple(_PROGRAMS.value),
                                echo=lambda line: print(line, flush=True),
                                on_result=_save_json if _JSON.value else None)
    except (InputError, TopologyError, ConfigError, pipeline.PipelineError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _JSON.value and not results:
        _save_json(results)
    failures = [line for line in map(aot.failure_line, results) if line]
    for line in failures:
        print(line, file=sys.stderr)
    if not failures:
        print(f"ok: {len(results)} program(s) compiled and fit on "
              f"{results[0]['chips'] if results else 0} x "
              f"{results[0]['device_kind'] if results else '?'}")
    return 1 if failures else 0


def main() -> None:
    sys.exit(_run(config_check.parse_flags_or_exit(sys.argv)))


if __name__ == "__main__":
    main()
