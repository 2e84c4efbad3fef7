"""Scaling study across TPU pod slices, from XLA's compiler estimates (no TPU needed).

    python benchmarks/scaling.py --out benchmarks/scaling [--models sd15,sdxl,score]
        [--families v5e,v5p,v6e] [--chips 4,8,16,32,64,128,256] [--root MODELS] [--no_msa]
    python benchmarks/scaling.py --from_json sd15:sd15_v5e8.json,...   (saved checks' rows)

For every (model, chip family, chip count) it compiles, for the compile-only devices of that
slice (`fifa_jax.aot`), the SD1.5 or SDXL Diffusion-DPO train step with the settings of the
configs' recipe for the slice (`fifa_jax/aot/recipes.py`: pairs a chip, remat, FSDP split
and tactic, reference dtype; the effective batch kept by accumulation on the host: a row's
step is grad_accum micro-steps and one update, its memory the larger program's), or the
score step with the
ViT-H/14 reward (PickScore's layout, 256 images a chip, bfloat16). It writes
OUT/scaling.csv (one row a compile; rerunning skips the rows already there, so a long sweep
resumes) and OUT/scaling.png: per-chip memory against HBM, XLA's estimated step time, the
implied pairs a second and chip-hours for FiFA's budget (the config's updates x effective
batch) and for the full-data run (2,048 pairs x 2,000 updates), and the collective bytes a
step. Every figure is a compiler estimate (XLA's cost and memory analysis of the compiled
program), not a measurement; where XLA gives no time estimate of its own (est_source
"roofline") the time is max(FLOPs / peak, bytes / HBM bandwidth) from XLA's counts and the
chip's datasheet peaks, a lower bound.

Model folders: --root holds diffusers / CLIP folders (a download, or the config-only layouts
of `python -m fifa_jax.aot.layouts ROOT`, written to a temporary folder when --root is not
given). One full-size train step compile takes 10-60 minutes and up to 24 GB on two CPU
cores (SDXL's more: swap; `--no_msa` needs less, HBM then within a few percent of the full
compile's, not a bound, column `msa`); a score step about 20 s. `--from_json MODEL:FILE`
turns a saved `python -m fifa_jax.aot --json` result of the recipe's slice into its row
without compiling again.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FULL_DATA_PAIR_STEPS = 2048 * 2000          # the official full-data Diffusion-DPO run
CONFIGS = {"sd15": "configs/pickapic_sd15.py", "sdxl": "configs/pickapic_sdxl.py",
           "score": "configs/pickapic_sd15.py"}
FIELDS = ("model", "program", "family", "chips", "topology", "data", "fsdp", "param_tactic",
          "pairs_per_chip",
          "micro_batch", "grad_accum", "effective_batch", "remat", "ref_dtype", "compiled",
          "fits", "msa", "gib_per_chip", "hbm_gib", "tflop_per_chip", "est_step_s", "est_source",
          "est_pairs_per_s", "est_chip_hours_fifa", "est_chip_hours_full",
          "collective_gib_per_step", "all_gather", "reduce_scatter", "all_reduce",
          "all_to_all", "compile_s", "error")


def _target(family: str, chips: int) -> str:
    """Cloud TPU slice name: v4 / v5p count TensorCores (two a chip), v5e / v6e chips."""
    return f"{family}-{chips * 2 if family in ('v4', 'v5p') else chips}"


def _config(model: str, root: str, target: str):
    from fifa_jax.config_check import load_config_file
    config = load_config_file(os.path.join(REPO, CONFIGS[model]) + f":{root},{target}")
    if model == "score":
        config.stages = "score"
        config.score.reward.batch_size = 256
        config.score.reward.dtype = "bfloat16"
    else:
        config.stages = "train"
    return config


def _train_step(res: list[dict], accum: int) -> dict:
    """One update from the host loop's programs (`train.accumulate=host`): memory the larger
    program's, FLOPs, time and collectives those of `accum` micro-steps and one update."""
    micro, update = res
    step = dict(micro)
    step.update(compiled=micro["compiled"] and update["compiled"],
                fits=micro["fits"] and update["fits"],
                bytes_per_chip=max(micro["bytes_per_chip"] or 0, update["bytes_per_chip"] or 0),
                error=micro["error"] or update["error"])
    step["flops"] = (None if micro["flops"] is None or update["flops"] is None
                     else accum * micro["flops"] + update["flops"])
    for key in ("estimated_seconds", "roofline_seconds"):
        m, u = micro.get(key), update.get(key)
        step[key] = None if not m or u is None else accum * m + u
    col = {}
    for r, times in ((micro, accum), (update, 1)):
        for k, v in (r.get("collectives") or {}).items():
            c = col.setdefault(k, {"count": 0, "bytes": 0.0})
            c["count"] += v["count"] * times
            c["bytes"] += v["bytes"] * times
    step["collectives"] = col
    return step


def _programs(model: str) -> tuple[str, ...]:
    """The programs a row is made of: the score step, or the host loop's two train programs."""
    return ("score_step",) if model == "score" else ("train_micro_step", "train_update")


def one(model: str, family: str, chips: int, root: str) -> dict:
    from fifa_jax.aot import run_check
    from fifa_jax.aot.topology import slice_name
    target = _target(family, chips)
    config = _config(model, root, target)
    t0 = time.time()
    res = run_check(config, slice_name(target), only=_programs(model))
    return to_row(model, family, chips, config, res, time.time() - t0)


def to_row(model: str, family: str, chips: int, config, res: list[dict],
           compile_s: float) -> dict:
    """One CSV row from `run_check`'s results (or `fifa_jax.aot --json`'s list) for `model` on
    `chips` chips of `family`: the score step, or the train micro-step and update."""
    from fifa_jax.aot.topology import GIB, slice_name
    by_name = {r["program"]: r for r in res}
    if model == "score":
        res = by_name["score_step"]
        program = "score_step"
    else:                   # the recipes accumulate on the host: micro-steps, then the update
        res = _train_step([by_name["train_micro_step"], by_name["train_update"]],
                          int(config.train.grad_accum))
        program = "train_step"
    s = res["settings"]
    row = {"model": model, "program": program, "family": family, "chips": chips,
           "topology": slice_name(_target(family, chips)), "data": s["mesh"]["data"],
           "fsdp": s["mesh"]["fsdp"],
           "param_tactic": s.get("param_tactic") or config.mesh.get("param_tactic", ""),
           "compiled": res["compiled"], "fits": res["fits"], "msa": res.get("msa", True),
           "gib_per_chip": _r(res["bytes_per_chip"], GIB), "hbm_gib": _r(res["hbm_bytes"], GIB),
           "tflop_per_chip": _r(res["flops"], 1e12),
           # XLA's own estimate; where it gives none, the roofline of XLA's FLOPs and bytes
           "est_step_s": res["estimated_seconds"] or res.get("roofline_seconds"),
           "est_source": "xla" if res["estimated_seconds"] else (
               "roofline" if res.get("roofline_seconds") else ""),
           "compile_s": round(compile_s, 1), "error": res["error"] or ""}
    col = res.get("collectives") or {}
    for key in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all"):
        row[key.replace("-", "_")] = col.get(key, {}).get("count")
    row["collective_gib_per_step"] = (_r(sum(v["bytes"] for v in col.values()), GIB)
                                      if col else None)
    if model != "score":
        tc = config.train
        eff = int(tc.batch_size) * int(tc.grad_accum)
        row.update(pairs_per_chip=s["pairs_per_chip"], micro_batch=int(tc.batch_size),
                   grad_accum=int(tc.grad_accum), effective_batch=eff, remat=tc.remat,
                   ref_dtype=tc.ref_dtype)
        est = row["est_step_s"]
        if est:
            pps = eff / est
            fifa_pair_steps = eff * int(tc.num_steps)
            row.update(est_pairs_per_s=round(pps, 2),
                       est_chip_hours_fifa=round(fifa_pair_steps / pps / 3600 * chips, 3),
                       est_chip_hours_full=round(FULL_DATA_PAIR_STEPS / pps / 3600 * chips, 2))
    else:
        row.update(pairs_per_chip=s["images_per_chip"] / 2, micro_batch=None)
        if row["est_step_s"]:              # images a second -> pairs (two images) a second
            row["est_pairs_per_s"] = round(s["images_per_chip"] * chips / 2
                                           / row["est_step_s"], 1)
    return row


def from_json(spec: str, root: str) -> dict:
    """'MODEL:FILE' (FILE written by `python -m fifa_jax.aot --json` for that model's config
    and the recipe's slice) -> its CSV row, without compiling again."""
    import json
    model, path = spec.split(":", 1)
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    missing = [n for n in _programs(model) if n not in {r.get("program") for r in res}]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)} result (compile the {model!r} "
                         f"config's {'score' if model == 'score' else 'train'} stage)")
    family, chips = res[0]["topology"].replace(":", "-").split("-")[0], int(res[0]["chips"])
    config = _config(model, root, _target(family, chips))
    return to_row(model, family, chips, config, res,
                  sum(r.get("compile_seconds") or 0 for r in res
                      if r["program"] in _programs(model)))


def _r(x, unit):
    return None if x is None else round(x / unit, 3)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def val(r, k):
        try:
            return float(r[k])
        except (TypeError, ValueError, KeyError):
            return None

    panels = [("gib_per_chip", "GiB a chip (dashed: the chip's HBM)"),
              ("est_step_s", "estimated seconds: an update (train), 256 images a chip (score)"),
              ("est_pairs_per_s", "estimated pairs a second, whole slice"),
              ("est_chip_hours_fifa", "estimated chip-hours, FiFA budget (train)"),
              ("est_chip_hours_full", "estimated chip-hours, 2,048 x 2,000 pair-steps (train)"),
              ("collective_gib_per_step", "collective GiB a step, a chip (0 not shown)")]
    colours = {"v4": "C3", "v5e": "C0", "v5p": "C1", "v6e": "C2"}     # one colour a chip
    markers = {"score": "o", "sd15": "s", "sdxl": "^"}                # one marker a model
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    # a series a model, chip and compile mode: full compiles and no-MSA ones are not joined
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["family"], r.get("msa") == "False"), []).append(r)
    keys = sorted(groups)
    for ax, (field, title) in zip(axes.flat, panels):
        for model, family, unplaced in keys:
            series = groups[(model, family, unplaced)]
            pts = sorted((int(r["chips"]), val(r, field)) for r in series
                         if val(r, field) and r["compiled"] == "True")
            # hollow: the roofline bound (XLA gave no estimate for the chip); dashed: compiled
            # without memory-space assignment (HBM near the full compile's, not a bound)
            roof = all(r["est_source"] == "roofline" for r in series)
            if pts:
                ax.plot(*zip(*pts), marker=markers.get(model, "o"), color=colours[family],
                        ls="--" if unplaced else "-", ms=7,
                        mfc="none" if roof and field.startswith("est_") else colours[family],
                        label=f"{model} {family}" + (" (time: roofline)" if roof else "")
                        + (" (no MSA)" if unplaced else ""))
        if field == "gib_per_chip":
            for family in sorted({f for _, f, _ in keys}):
                hbm = [val(r, "hbm_gib") for r in rows if r["family"] == family]
                if hbm and hbm[0]:
                    ax.axhline(hbm[0], ls="--", lw=0.8, color=colours[family])
                    ax.text(1.02, hbm[0], f"{family} {hbm[0]:g}", color=colours[family],
                            fontsize=7, va="center", transform=ax.get_yaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xlim(3, 340)
        ax.set_yscale("log")
        ax.set_xlabel("chips")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("FiFA Diffusion-DPO on TPU slices: XLA compiler estimates (compile-only "
                 "devices; nothing was run)", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def _append(rows: list[dict], row: dict, csv_path: str) -> None:
    """Print `row`, add it to `rows` and rewrite the CSV (a sweep resumes from it)."""
    print(", ".join(f"{k}={row.get(k)}" for k in FIELDS if row.get(k) not in (None, "")),
          flush=True)
    rows.append({k: ("" if row.get(k) is None else str(row.get(k))) for k in FIELDS})
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "scaling"))
    ap.add_argument("--models", default="sd15,sdxl,score")
    ap.add_argument("--families", default="v5e,v5p,v6e")
    ap.add_argument("--chips", default="4,8,16,32,64,128,256")
    ap.add_argument("--root", default="", help="model folders (default: config-only layouts)")
    ap.add_argument("--plot_only", action="store_true")
    ap.add_argument("--no_msa", action="store_true", help="compile without libtpu's "
                    "memory-space assignment (as `fifa_jax.aot --no_msa`: HBM near, not a bound)")
    ap.add_argument("--from_json", default="", help="MODEL:FILE,...: rows from saved "
                    "`fifa_jax.aot --json` results of the recipe's slice (no compile)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "scaling.csv")
    rows = read_rows(csv_path)
    if args.no_msa:
        from fifa_jax.aot.topology import disable_msa
        disable_msa()
    if not args.plot_only:
        root = args.root
        if not root:
            from fifa_jax.aot import layouts
            root = tempfile.mkdtemp(prefix="fifa_layouts_")
            layouts.write(root)
        done = {(r["model"], r["family"], r["chips"]) for r in rows}
        for spec in filter(None, args.from_json.split(",")):
            row = from_json(spec, root)
            if (row["model"], row["family"], str(row["chips"])) not in done:
                _append(rows, row, csv_path)
                done.add((row["model"], row["family"], str(row["chips"])))
        models = [] if args.from_json else args.models.split(",")    # saved rows only
        for model in models:
            for family in args.families.split(","):
                for chips in (int(c) for c in args.chips.split(",")):
                    if (model, family, str(chips)) in done:
                        continue
                    _append(rows, one(model, family, chips, root), csv_path)
    if rows:
        plot(rows, os.path.join(args.out, "scaling.png"))
        print(f"wrote {csv_path} and {os.path.join(args.out, 'scaling.png')} "
              f"(compiler estimates)")


if __name__ == "__main__":
    main()
