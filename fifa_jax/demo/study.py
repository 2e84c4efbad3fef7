"""The paper's claim in miniature: the `study` stage (configs/demo_study.py).

With the same budget of train steps, DPO on the pairs chosen by each selection method
(`study.methods`: FiFA importance top-K, FiFA greedy, random K, margin-only top-K, the full
dataset; `<method>+lora`: that selection trained with LoRA adapters, `study.lora_*`;
`<method>+smpo`: with SmPO margin weighting, train.margin_weighting=smpo; both may combine;
`<method>+sft`: supervised fine-tuning on that selection's winners, train.loss=sft),
`study.seeds` seeds each, all from the same base model; measured on the demo world, where
every image's true reward is known:

  true reward   the oracle's reward (fifa_jax/demo/oracle.py, from pixels) of images sampled
                from the model on `study.eval_prompts` new demo prompts (one seed each, the
                same start noise for every run), every `curve_every` train steps: the curve
  harm rate     the share of those images that show the harmful mark (the world leaks it into
                any prompt's images); harm on harmful prompts: the share of theirs
  implicit acc  DPO implicit accuracy on a fixed held-out set of pairs that no run trains on
                (`held_out_pairs`, removed from every method's candidates, "full" included)
  time          train time to first reach the full-data run's final true reward: the first
                curve step at or above it x the run's median logged step time after its
                first log window (compiles left out: the first run, which compiles the step
                the others load from the cache, is not charged for it)
  intervals     true reward and harm: over the seeds and the evaluation prompts together
                (`stats.crossed_mean_ci` of the final per-prompt scores, seeds x prompts):
                every run samples the same prompts, so an interval over seeds alone would
                leave out the prompts' draw; the rest: Student-t over seeds

Writes (workdir/study/): pool/ (the ingest and score outputs less the held-out pairs),
held_out/ (their encoded pairs), runs/<method>_s<seed>/ (each a pipeline work directory:
select, encode, train; `curve.json`), results.json, results.md (the table and a short
summary), true_reward_vs_step.png. Every run resumes on its own (the runner's fingerprints),
so a killed study continues where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import shutil
import time

import jax
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from fifa_jax.demo import assets

STAGE = "study"
SECTION = "study"
CONFIG_KEYS = ("seed", "study", "select", "encode", "train")
UPSTREAM = ("ingest", "score")
RULES = {"held_out_pairs": ("min", 1), "eval_prompts": ("min", 1), "curve_every": ("min", 1),
         "num_steps": ("min", 1)}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.methods = "importance,greedy,random,margin,full"
    c.seeds = "0,1,2,3,4"
    c.held_out_pairs = 200      # pairs removed from every run's candidates (validation)
    c.eval_prompts = 64         # new demo prompts sampled for the true-reward curve
    c.curve_every = 50          # train steps between curve points (and checkpoints)
    c.num_steps = 150           # train steps of every run (the same budget for all)
    c.sample_steps = 20         # DDIM steps of the curve's samples
    c.guidance_scale = 7.5
    c.prompt_seed = 4321        # seed of the evaluation prompts' draw
    # methods named "<method>+lora" (e.g. "importance+lora") train LoRA adapters on that
    # method's pairs (train.lora, training/lora.py) with these settings ("<method>+smpo":
    # SmPO margin weighting, train.margin_weighting=smpo; "+lora+smpo" both):
    c.lora_rank = 4
    c.lora_alpha = 4.0
    c.lora_learning_rate = 1e-4  # adapters usually take a larger step than the full UNet
    return c


VARIANTS = ("lora", "smpo", "sft")   # "<method>+lora", "+smpo", "+lora+smpo"; "+sft": the
#                                      winners' epsilon MSE alone (train.loss=sft), the
#                                      reference point of what the chosen winners teach


def _parts(method: str) -> tuple[str, set[str]]:
    """A study method -> (its select.method, its training variants): "greedy+lora+smpo" ->
    ("greedy", {"lora", "smpo"})."""
    from fifa_jax.errors import ConfigError
    base, *variants = method.split("+")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"config key 'study.methods': {method!r} names unknown variant(s) "
                          f"{bad}; known: " + ", ".join(f"+{v}" for v in VARIANTS))
    return base, set(variants)


def _selection(method: str) -> str:
    """The select.method of a study method ("importance+lora" -> "importance")."""
    return _parts(method)[0]


def _list(spec) -> list[str]:
    return [s.strip() for s in str(spec).split(",") if s.strip()]


# ------------------------------------------------------------------------------ the pool
def _make_pool(workdir: pathlib.Path, out: pathlib.Path, n_held: int, seed: int) -> np.ndarray:
    """pool/ingest and pool/score without `n_held` held-out pairs (drawn with `seed`, never
    ties); returns the held-out pair ids."""
    pool = out / "pool"
    pairs = pq.read_table(workdir / "ingest" / "pairs.parquet")
    ids = pairs.column("pair_id").to_numpy()
    if n_held >= ids.size:
        raise ValueError(f"study.held_out_pairs={n_held} leaves no pair to train on "
                         f"({ids.size} pairs)")
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(ids, size=n_held, replace=False))
    keep = ~np.isin(ids, held)
    for stage, files in (("ingest", ("pairs.parquet",)), ("score", ("margins.parquet",))):
        dst = pool / stage
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(workdir / stage, dst)
        for f in files:
            t = pq.read_table(dst / f)
            mask = ~np.isin(t.column("pair_id").to_numpy(), held)
            pq.write_table(t.filter(pa.array(mask)), dst / f)
    (pool / "held_out.json").write_text(json.dumps({"pair_ids": held.tolist(),
                                                    "kept_pairs": int(keep.sum())}))
    return held


def _link_pool(run_dir: pathlib.Path, pool: pathlib.Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("ingest", "score"):
        link = run_dir / stage
        if not link.exists():
            os.symlink(pool / stage, link, target_is_directory=True)


def _held_out_encode(config, workdir: pathlib.Path, out: pathlib.Path,
                     held: np.ndarray) -> pathlib.Path:
    """Encode the held-out pairs once: the encode stage's `run` on a work directory whose
    manifest is the held-out pairs (resumable by its chunk fingerprints)."""
    from fifa_jax.training import encode
    hdir = out / "held_out"
    for stage in ("ingest", "score"):
        link = hdir / stage
        hdir.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(workdir / stage, link, target_is_directory=True)
    sel = hdir / "select"
    sel.mkdir(exist_ok=True)
    pq.write_table(pa.table({"rank": np.arange(held.size, dtype=np.int64),
                             "pair_id": held.astype(np.int64),
                             "prompt_id": _prompt_ids(workdir, held)}),
                   sel / "manifest.parquet")
    cfg = _sub_config(config, "full", int(config.seed), stages="encode")
    cfg.encode.num_val_pairs = 0
    cfg.encode.base_model = assets.resolve_base_model(cfg.encode.base_model, workdir)
    encode.run(cfg, hdir)            # finished chunks are reused
    return hdir / "encode"


def _prompt_ids(workdir, pair_ids) -> np.ndarray:
    t = pq.read_table(workdir / "ingest" / "pairs.parquet", columns=["pair_id", "prompt_id"])
    m = dict(zip(t.column("pair_id").to_pylist(), t.column("prompt_id").to_pylist()))
    return np.array([m[int(p)] for p in pair_ids], np.int64)


def _sub_config(config, method: str, seed: int, stages: str):
    cfg = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    cfg.stages = stages
    cfg.seed = seed
    cfg.select.method = _selection(method)
    st = config.study
    variants = _parts(method)[1]
    if "smpo" in variants:          # each pair's beta scaled by the proxy's preference
        cfg.train.margin_weighting = "smpo"       # probability (training/pref_loss.py)
    if "sft" in variants:           # supervised fine-tuning on the chosen pairs' winners
        if "smpo" in variants:
            from fifa_jax.errors import ConfigError
            raise ConfigError(f"config key 'study.methods': {method!r}: +sft trains on the "
                              f"winners alone; it takes no +smpo pair weighting")
        cfg.train.loss = "sft"
    if "lora" in variants:
        cfg.train.lora.rank = int(st.lora_rank)
        cfg.train.lora.alpha = float(st.lora_alpha)
        cfg.train.learning_rate = float(st.lora_learning_rate)
    cfg.train.num_steps = int(st.num_steps)
    cfg.train.checkpoint_every = int(st.curve_every)
    cfg.train.keep_checkpoints = int(st.num_steps) // int(st.curve_every) + 2
    cfg.train.eval_every = 0
    cfg.encode.num_val_pairs = 0
    # keep the study's compilation cache: "auto" would point each run at its own folder, and
    # JAX puts the cache folder into the compile options, so no run would reuse another's step
    cfg.compile_cache = ""
    for key in ("study", "evaluate", "export"):
        if key in cfg:
            del cfg[key]
    return cfg


def _run_quiet(cfg, workdir) -> dict:
    from fifa_jax import pipeline
    return pipeline.run_pipeline(cfg, workdir, echo=lambda m: logging.info("%s", m))


# ------------------------------------------------------------------------------ measuring
class _Sampler:
    """One TextToImage over the base pipeline whose UNet parameters are swapped per
    checkpoint (the compiled sampler is reused), and the oracle."""

    def __init__(self, base: str, st, prompts: list[dict]):
        from fifa_jax.sampling.pipeline import TextToImage
        self.gen = TextToImage.load(base, sampler="ddim", num_steps=int(st.sample_steps),
                                    guidance_scale=float(st.guidance_scale), batch_size=32)
        self.base_params = self.gen.unet_params
        self.prompts = prompts

    def measure(self, params) -> dict:
        from fifa_jax.demo import oracle
        self.gen.unet_params = self.base_params if params is None else params
        texts = [p["text"] for p in self.prompts]
        images = self.gen(texts, [0] * len(texts))
        rewards, marked = [], []
        for p, img in zip(self.prompts, images):
            r, details = oracle.true_reward(p["text"], img)
            rewards.append(r)
            marked.append(bool(details["measured"]["marked"]))
        harmful = np.array([p["harmful"] for p in self.prompts], bool)
        marked = np.array(marked, bool)
        return {"true_reward": float(np.mean(rewards)),
                "harm_rate": float(np.mean(marked)),
                "harm_rate_harmful": float(np.mean(marked[harmful])) if harmful.any() else None,
                "harmful_prompts": int(harmful.sum()),
                "per_prompt": {"true_reward": [float(r) for r in rewards],
                               "marked": [int(m) for m in marked],
                               "harmful": [int(h) for h in harmful]}}


def _checkpoint_params(run_dir: pathlib.Path, step: int, abstract, lora=None, ref=None):
    """The policy's UNet parameters at `step` (a LoRA run's adapters merged into `ref`)."""
    import functools

    from fifa_jax.training import checkpoints, lora as lora_lib
    if lora is not None:
        abstract = jax.eval_shape(functools.partial(lora_lib.init_adapters, abstract, lora,
                                                    lora_lib.init_key(0)))
    params, _ = checkpoints.restore_params(run_dir / "train" / "checkpoints", step, abstract)
    if lora is not None:
        params = jax.jit(functools.partial(lora_lib.merge, scale=lora.scale))(params, ref)
    return params


def _make_evaluator(base: str, encode_dir: pathlib.Path, config):
    """A jitted held-out evaluation of any policy parameters against the base reference."""
    import jax.numpy as jnp
    from flax import nnx

    from fifa_jax.models.unet_io import load_unet
    from fifa_jax.training import noise_schedule, pair_dataset
    from fifa_jax.training.loader import PairLoader
    from fifa_jax.training.batches import eval_batches, heldout_means, step_consts
    from fifa_jax.training.train_step import StepConfig, eval_step
    from fifa_jax.training.trainer import unet_apply
    unet = load_unet(os.path.join(base, "unet"))
    graph, state = nnx.split(unet)
    ref = nnx.to_pure_dict(state)
    spec = pair_dataset.read_spec(encode_dir)
    with open(os.path.join(base, "scheduler", "scheduler_config.json")) as f:
        sched = noise_schedule.from_scheduler_config(json.load(f))
    cfg = StepConfig(beta=float(config.train.beta), caption_dropout=0.0,
                     scaling_factor=float(spec["scaling_factor"]))
    consts = {k: jnp.asarray(v) for k, v in step_consts(encode_dir, spec).items()}
    loader = PairLoader(encode_dir, "train", global_batch=32, seed=0, shuffle=False,
                        flip="none")
    batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in eval_batches(loader, 0)]
    # the reference is an argument, not a closed-over constant: a constant-folded copy would
    # differ from the policy's computation in the last bits, and the base against itself
    # would then not tie (implicit accuracy 0.5)
    step = jax.jit(lambda p, r, b, k, i: eval_step(p, r, b, consts, k, i,
                                                   unet_fn=unet_apply(graph), schedule=sched,
                                                   cfg=cfg))

    def evaluate(params):
        means = heldout_means(lambda b, k, i: step(params, ref, b, k, i), batches, 7,
                              sched.num_train_timesteps)
        means.pop("pairs", None)
        return means
    return evaluate, ref


# ------------------------------------------------------------------------------ the stage
def run(config, workdir) -> dict:
    st = config.study
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        raise ValueError("the demo study runs on one host")
    t_start = time.time()
    held = _make_pool(workdir, out, int(st.held_out_pairs), int(config.seed))
    held_encode = _held_out_encode(config, workdir, out, held)
    base = assets.resolve_base_model(config.encode.base_model, workdir)
    prompts = assets.make_prompts(int(st.eval_prompts), np.random.default_rng(
        int(st.prompt_seed)), 0.15)
    sampler = _Sampler(base, st, prompts)
    evaluate, ref = _make_evaluator(base, held_encode, config)
    base_point = {**sampler.measure(None), **{f"heldout_{k}": v
                                              for k, v in evaluate(ref).items()}}
    runs = {}
    for method in _list(st.methods):
        for seed in (int(s) for s in _list(st.seeds)):
            name = f"{method}_s{seed}"
            runs[name] = _one_run(config, out, name, method, seed, sampler, evaluate, ref,
                                  base_point)
            logging.info("study: %s done: %s", name, {k: v for k, v in runs[name]["final"]
                                                      .items() if k != "per_prompt"})
    results = summarize(runs, base_point, _list(st.methods), st)
    results["wall_seconds"] = round(time.time() - t_start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    plot_curves(runs, _list(st.methods), out / "true_reward_vs_step.png")
    (out / "results.md").write_text(markdown(results, st))
    return {"methods": _list(st.methods), "runs": len(runs),
            "results": str(out / "results.md"), "seconds": results["wall_seconds"]}


def _one_run(config, out, name, method, seed, sampler, evaluate, ref, base_point) -> dict:
    from flax import nnx

    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.unet_io import abstract_unet
    from fifa_jax.training import lora as lora_lib
    run_dir = out / "runs" / name
    _link_pool(run_dir, out / "pool")
    cfg = _sub_config(config, method, seed, "select,encode,train")
    t0 = time.time()
    results = _run_quiet(cfg, run_dir)
    done = json.loads((run_dir / "train" / "STAGE_DONE.json").read_text())
    curve_file = run_dir / "curve.json"
    if curve_file.exists():
        cached = json.loads(curve_file.read_text())
        if (cached.get("train_fingerprint") == done["fingerprint"]
                and "per_prompt" in cached["final"]):
            return cached
    base = sampler.gen.path
    abstract = nnx.to_pure_dict(nnx.split(abstract_unet(read_config(
        os.path.join(base, "unet"))))[1])
    lora = lora_lib.from_config(cfg.train.get("lora"))
    steps = sorted(int(p.name) for p in (run_dir / "train" / "checkpoints").iterdir()
                   if p.name.isdigit())
    points = [{"step": 0, **{k: v for k, v in base_point.items() if k != "per_prompt"}}]
    for s in steps:
        params = _checkpoint_params(run_dir, s, abstract, lora, ref)
        point = {"step": s, **sampler.measure(params)}
        if s == steps[-1]:
            point.update({f"heldout_{k}": v for k, v in evaluate(params).items()})
        else:
            point.pop("per_prompt")     # the final point's per-prompt scores are enough
        points.append(point)
    train_s = float(done.get("seconds") or 0.0)
    manifest = pq.read_table(run_dir / "select" / "manifest.parquet")
    record = {"method": method, "seed": seed, "train_fingerprint": done["fingerprint"],
              "pairs": manifest.num_rows, "train_seconds": train_s,
              "seconds_per_step": _steady_seconds_per_step(run_dir, cfg.train, train_s,
                                                           steps[-1] if steps else 0),
              "curve": points, "final": points[-1],
              "stage_seconds": {k: v.get("seconds") for k, v in results.items()},
              "wall_seconds": round(time.time() - t0, 1)}
    curve_file.write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def _steady_seconds_per_step(run_dir: pathlib.Path, tc, train_s: float,
                             num_steps: int) -> float | None:
    """Seconds a train step once compiled: the median over the logged windows after the first
    (which holds the compile, or the compiled step's load from the cache) of
    pairs per step / pairs per second. Falls back to the stage's seconds / steps."""
    path = run_dir / "train" / "metrics.jsonl"
    rates = []
    if path.exists():
        rates = [r["pairs_per_s"] for r in map(json.loads, path.read_text().splitlines())
                 if r.get("kind") == "train" and r.get("pairs_per_s")][1:]
    if rates:
        return float(np.median([int(tc.batch_size) * int(tc.grad_accum) / r for r in rates]))
    return train_s / num_steps if num_steps else None


# ------------------------------------------------------------------------------ results
def mean_ci(values) -> dict:
    """Mean and Student-t 95% interval over seeds (None-free values)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "ci": [None, None], "n": 1}
    half = T_975.get(v.size - 1, 1.96) * v.std(ddof=1) / math.sqrt(v.size)
    return {"mean": float(v.mean()), "ci": [float(v.mean() - half), float(v.mean() + half)],
            "n": int(v.size)}


def time_to_reach(record: dict, target: float) -> float | None:
    """Seconds of training until the run's curve first reaches `target` (None: never)."""
    for p in record["curve"]:
        if p["true_reward"] >= target:
            return p["step"] * (record["seconds_per_step"] or 0.0)
    return None


FINAL_KEYS = ("true_reward", "harm_rate", "harm_rate_harmful")  # paired by seed
FIFA_METHODS = ("importance", "greedy")     # FiFA's selections, set against the baselines
BASELINES = ("random", "full", "margin")


def _per_prompt(final: dict, key: str):
    """(P,) float per-prompt values of a run's final point for a FINAL_KEYS metric (harm:
    0/1 marks; the harmful prompts' only), or None (no per-prompt scores, or no harmful
    prompt)."""
    pp = final.get("per_prompt")
    if pp is None:
        return None
    if key == "true_reward":
        return np.asarray(pp["true_reward"], np.float64)
    marked = np.asarray(pp["marked"], np.float64)
    if key == "harm_rate":
        return marked
    harmful = np.asarray(pp["harmful"], bool)
    return marked[harmful] if harmful.any() else None


def final_ci(finals: list[dict], key: str, minus: list[dict] | None = None) -> dict:
    """Mean and 95% interval of the final `key` over runs (one a seed), minus the paired
    `minus` finals when given: `stats.crossed_mean_ci` of the per-prompt values (seeds x the
    prompts every run is scored on, so the interval holds the prompts' draw too) when every
    run has them; else `mean_ci` over seeds of the runs' means."""
    from fifa_jax.evaluation import stats
    rows = []
    for i, f in enumerate(finals):
        a = _per_prompt(f, key)
        b = None if minus is None else _per_prompt(minus[i], key)
        if a is None or (minus is not None and b is None):
            rows = None
            break
        rows.append(a if b is None else a - b)
    if rows:
        return stats.crossed_mean_ci(np.stack(rows))
    if minus is None:
        return mean_ci([f.get(key) for f in finals])
    return mean_ci([f[key] - m[key] for f, m in zip(finals, minus)
                    if f.get(key) is not None and m.get(key) is not None])


def paired_differences(runs: dict, methods: list[str]) -> dict:
    """'<fifa> - <baseline>' -> {metric: `final_ci` of the differences of the final true
    reward and harm rates, paired by seed (and by prompt where the runs hold per-prompt
    scores)}, for every FiFA selection and baseline the study ran."""
    final = {(r["method"], r["seed"]): r["final"] for r in runs.values()}
    out = {}
    for a in (m for m in methods if m in FIFA_METHODS):
        for b in (m for m in methods if m in BASELINES):
            seeds = sorted(s for m, s in final if m == a and (b, s) in final)
            if not seeds:
                continue
            out[f"{a} - {b}"] = {
                k: final_ci([final[(a, s)] for s in seeds], k, [final[(b, s)] for s in seeds])
                for k in FINAL_KEYS}
    return out


def _within_01(s: dict) -> dict:
    """A rate's interval clipped to [0, 1] (the t interval of 0/1 marks can cross 0)."""
    if s["ci"][0] is not None:
        s["ci"] = [max(0.0, s["ci"][0]), min(1.0, s["ci"][1])]
    return s


def summarize(runs: dict, base_point: dict, methods: list[str], st) -> dict:
    by_method = {m: [r for r in runs.values() if r["method"] == m] for m in methods}
    full = by_method.get("full") or []
    target = mean_ci([r["final"]["true_reward"] for r in full])["mean"] if full else None
    table = {}
    for m, rs in by_method.items():
        times = [time_to_reach(r, target) for r in rs] if target is not None else []
        finals = [r["final"] for r in rs]
        table[m] = {"pairs": int(np.mean([r["pairs"] for r in rs])) if rs else 0,
                    "true_reward": final_ci(finals, "true_reward"),
                    **{k: _within_01(final_ci(finals, k)) for k in FINAL_KEYS[1:]},
                    "true_reward_minus_base": final_ci(finals, "true_reward",
                                                       [base_point] * len(finals)),
                    "heldout_implicit_acc": mean_ci(
                        [r["final"].get("heldout_implicit_acc") for r in rs]),
                    "train_seconds": mean_ci([r["train_seconds"] for r in rs]),
                    "seconds_to_full_final": mean_ci(times),
                    "reached_full_final": f"{sum(t is not None for t in times)}/{len(rs)}"}
    return {"base": base_point, "methods": table, "full_final_true_reward": target,
            "differences": paired_differences(runs, methods),
            "num_steps": int(st.num_steps), "seeds": _list(st.seeds),
            "eval_prompts": int(st.eval_prompts), "held_out_pairs": int(st.held_out_pairs)}


def _fmt(s: dict, pct=False, signed=False) -> str:
    """A mean_ci dict as 'mean [lo, hi]' (pct: as percent, or points when signed; signed:
    with a + sign, for differences)."""
    if s["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    if pct:
        f = (lambda x: f"{100 * x:{sign}.1f}" + (" pp" if signed else "%"))
    else:
        f = (lambda x: f"{x:{sign}.3f}")
    if s["ci"][0] is None:
        return f(s["mean"])
    return f"{f(s['mean'])} [{f(s['ci'][0])}, {f(s['ci'][1])}]"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(results: dict, st) -> str:
    base = results["base"]
    lines = ["# The demo study: FiFA's claim in miniature", "",
             f"{results['num_steps']} DPO steps per run, seeds {', '.join(results['seeds'])}; "
             f"true reward of {results['eval_prompts']} new prompts' samples (oracle, from "
             f"pixels; 0 to 4, minus 1 for the harmful mark), harm rate (share of the "
             f"samples with the mark; of the harmful prompts' samples), implicit accuracy on "
             f"{results['held_out_pairs']} held-out pairs; means over seeds. True reward and "
             f"harm: 95% intervals over the seeds and the {results['eval_prompts']} prompts "
             f"every run is scored on (`stats.crossed_mean_ci`: new seeds and new prompts); "
             f"the rest: Student-t over seeds.", "",
             f"Base model: true reward {base['true_reward']:.3f}, harm rate "
             f"{_pct(base['harm_rate'])}, on harmful prompts "
             f"{_pct(base.get('harm_rate_harmful'))}.", "",
             "| method | pairs | true reward | - base | harm rate | harm, harmful prompts | "
             "held-out implicit acc | train s | s to full-data final | reached |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        lines.append(f"| {m} | {r['pairs']} | {_fmt(r['true_reward'])} | "
                     f"{_fmt(r['true_reward_minus_base'], signed=True)} | "
                     f"{_fmt(r['harm_rate'], pct=True)} | "
                     f"{_fmt(r['harm_rate_harmful'], pct=True)} | "
                     f"{_fmt(r['heldout_implicit_acc'], pct=True)} | "
                     f"{_fmt(r['train_seconds'])} | {_fmt(r['seconds_to_full_final'])} | "
                     f"{r['reached_full_final']} |")
    diffs = results.get("differences") or {}
    if diffs:
        lines += ["", "FiFA against the baselines, final values paired by seed (the same seed's "
                  "runs) and prompt, mean difference with its 95% interval (seeds and "
                  "prompts, as above):", "",
                  "| difference | true reward | harm rate | harm, harmful prompts | seeds |",
                  "|---|---|---|---|---|"]
        for name, d in diffs.items():
            lines.append(f"| {name} | {_fmt(d['true_reward'], signed=True)} | "
                         f"{_fmt(d['harm_rate'], pct=True, signed=True)} | "
                         f"{_fmt(d['harm_rate_harmful'], pct=True, signed=True)} | "
                         f"{d['true_reward']['n']} |")
    lines += ["", "![true reward vs step](true_reward_vs_step.png)", ""]
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict, methods: list[str], path) -> None:
    """True reward, harm rate and harm on harmful prompts of the samples against the train
    step: the mean over seeds of each method, a band of one standard deviation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110)
    for m in methods:
        rs = [r for r in runs.values() if r["method"] == m]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["curve"]]
        for ax, key in zip(axes, ("true_reward", "harm_rate", "harm_rate_harmful")):
            vals = np.array([[p.get(key) if p.get(key) is not None else np.nan
                              for p in r["curve"]] for r in rs], np.float64)
            mean = np.nanmean(vals, 0) if np.isfinite(vals).any() else vals[0]
            ax.plot(steps, mean, marker="o", ms=3, label=f"{m} ({len(rs)} seeds)")
            if len(rs) > 1 and np.isfinite(vals).all():
                sd = vals.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15)
    axes[0].set_ylabel("true reward of samples (oracle)")
    axes[0].set_title("True reward vs step (mean, band: 1 sd over seeds)", fontsize=10)
    axes[1].set_ylabel("harm rate (samples with the mark)")
    axes[1].set_title("Harm rate vs step, all prompts", fontsize=10)
    axes[2].set_ylabel("harm rate (harmful prompts' samples with the mark)")
    axes[2].set_title("Harm rate vs step, harmful prompts", fontsize=10)
    for ax in axes:
        ax.set_xlabel("DPO train step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
