"""Ahead-of-time check of a config on a TPU slice, from a CPU-only machine.

    python -m fifa_jax.aot --config configs/pickapic_sd15.py:ROOT --topology v5e-16 \
        [--num_slices 2] [--json FILE] [--config.key=value ...]

Builds every heavy jitted program of the configured stages (`programs.py`) from the model
folders' config files, lowers it for the compile-only devices of the slice (`topology.py`)
and compiles it with libtpu; reports per chip the bytes XLA's memory analysis gives against
the chip's HBM, XLA's FLOPs and estimated seconds, and the collectives (`analysis.py`). All
figures are compiler figures: nothing runs.

    results = run_check(config, "v5e:2x2")    # one dict per program (analysis.check)
"""
from __future__ import annotations

from typing import Callable

from fifa_jax.aot.topology import GIB, PEAKS, hbm_bytes, mesh_over, msa_enabled, tpu_devices


def run_check(config, topology: str, *, num_slices: int = 1, hbm_gib: float | None = None,
              knn_rows: int | None = None, only: tuple[str, ...] = (),
              echo: Callable[[str], None] | None = None,
              on_result: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Compile the programs of `config.stages` for `topology`; one result dict a program.
    on_result(results so far) runs after each program (the CLI saves its JSON there, so a
    check cut short keeps the programs it finished)."""
    import jax
    from fifa_jax.aot import analysis, programs
    devices = tpu_devices(topology, num_slices)
    mesh = mesh_over(devices, config.get("mesh"))
    hbm = hbm_bytes(devices[0], hbm_gib)
    progs = programs.stage_programs(config, mesh, only=tuple(only),
                                    knn_rows=knn_rows or programs.PICKAPIC_PROMPTS)
    out = []
    # compile-only executables cannot be loaded from (or usefully stored in) the persistent
    # compilation cache: keep it off while checking
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        for p in progs:
            res = analysis.check(p, hbm)
            res.update(topology=topology, num_slices=int(num_slices), chips=len(devices),
                       msa=msa_enabled(),
                       device_kind=devices[0].device_kind,
                       roofline_seconds=roofline(res, devices[0].device_kind))
            out.append(res)
            if echo is not None:
                echo(row(res))
            if on_result is not None:
                on_result(out)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    return out


def save_json(results: list[dict], path: str) -> None:
    """Write the results list to `path` atomically (a temporary file, then a rename); as
    `on_result` it keeps the programs finished so far when a check is cut short."""
    import json
    import os
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, path)


def roofline(res: dict, device_kind: str) -> float | None:
    """max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) a chip, from XLA's cost
    analysis and the chip's datasheet peaks: a lower bound, for where XLA gives no estimate."""
    if device_kind not in PEAKS or not res.get("flops"):
        return None
    flops, bw = PEAKS[device_kind]
    return max(res["flops"] / flops, (res.get("bytes_accessed") or 0.0) / bw)


HEADER = ("program", "compiled", "fits", "GiB/chip", "HBM GiB", "args", "temps", "out",
          "alias", "TFLOP/chip", "est. s", "AG", "RS", "AR", "A2A")


def row(res: dict) -> str:
    """One line of the report table."""
    g = lambda n: "-" if n is None else f"{n / GIB:.2f}"  # noqa: E731
    col = res.get("collectives") or {}
    cnt = lambda k: str(col.get(k, {}).get("count", "-")) if col else "-"  # noqa: E731
    loops = res.get("loop_factor") or 1       # XLA's cost counts a loop body once
    per_pass = f" (1 of {loops} passes)" if loops > 1 else ""
    cells = (res["program"], "yes" if res["compiled"] else "no",
             "yes" if res["fits"] else "NO", g(res["bytes_per_chip"]), g(res["hbm_bytes"]),
             g(res["argument_bytes"]), g(res["temp_bytes"]), g(res["output_bytes"]),
             g(res["alias_bytes"]),
             "-" if res["flops"] is None else f"{res['flops'] / 1e12:.2f}" + per_pass,
             "-" if res["estimated_seconds"] is None else (f"{res['estimated_seconds']:.3f}"
                                                           + per_pass),
             cnt("all-gather"), cnt("reduce-scatter"), cnt("all-reduce"), cnt("all-to-all"))
    return "| " + " | ".join(cells) + " |"


def table_header() -> str:
    return "| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER)


def size(n: float) -> str:
    """Bytes as GiB (or MiB below one GiB)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def failure_line(res: dict) -> str | None:
    """One line for a program that did not compile or does not fit (None when it is fine)."""
    where = f"{res.get('chips')} x {res.get('device_kind')} ({res.get('topology')})"
    if res["compiled"] and res["fits"]:
        return None
    if res["bytes_per_chip"] is not None and not res["fits"]:
        return (f"error: {res['program']} does not fit on {where}: needs "
                f"{size(res['bytes_per_chip'])} a chip, {size(res['hbm_bytes'])} available; "
                f"{res['advice']}")
    return f"error: {res['program']} did not compile for {where}: {res['error']}"
