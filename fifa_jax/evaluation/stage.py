"""The evaluate stage: sample the base and the tuned model on prompt sets, score, compare.

Reads:  export/unet (the tuned UNet), the base model (train.base_model, "" = encode's),
        the scorers' checkpoints (evaluate.scorers), train/metrics.jsonl (training curves).
Writes (workdir/evaluate/):
  images/<set>/<base|tuned>/<prompt index>_<seed>.png   every generation
  scores/<set>.parquet       per image: prompt_id, prompt, seed, model, one column per metric,
                             nsfw (the safety checker's decision, when it runs)
  summary.json               per set and metric: means, medians, the win rate of tuned over base
                             per (prompt, seed) with a prompt-level bootstrap 95% interval, the
                             mean difference with its interval; harm rates with intervals
  report/index.html, report/report.md   the stand-alone report (tables, image grids,
                             score histograms, win rates, training curves)

Prompt sets (`evaluate.prompt_sets`, comma list of `kind:path`): pickapic (test_unique
parquet), partiprompts (TSV), hpsv2 (the benchmark's JSON files), text (one per line), and
`demo` (prompts drawn from the demo world's generator with a seed of their own, never the
training prompts' draw). Both models sample each (prompt, seed) from the same start noise
(sampling/pipeline.py), with `images_per_prompt` seeds 0..n-1.
Resumable: an image already written with the same generation settings is not redone; each
scorer's column is kept while its settings and the images are unchanged; every failure (an
image that does not decode, a scorer that is not configured) is counted in summary.json.
"""
from __future__ import annotations

import hashlib
import json
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
from PIL import Image
from tqdm import tqdm

from fifa_jax import parallel
from fifa_jax.errors import InputError
from fifa_jax.evaluation import prompt_sets, report as report_lib, stats
from fifa_jax.files import file_stats
from fifa_jax.models import platform
from fifa_jax.parallel import hosts
from fifa_jax.sampling import SAMPLERS
from fifa_jax.sampling.pipeline import TextToImage

STAGE = "evaluate"
SECTION = "evaluate"
CONFIG_KEYS = ("seed", "evaluate")
UPSTREAM = ("export",)
SPEED_ONLY = ("batch_size", "n_boot_workers")
MODELS = ("base", "tuned")
RULES = {"sampler": ("choice", tuple(SAMPLERS)), "num_steps": ("min", 1),
         "images_per_prompt": ("min", 1), "max_prompts": ("min", 0), "batch_size": ("min", 1),
         "dtype": ("choice", ("auto", "float32", "bfloat16")), "n_boot": ("min", 100),
         "grid_prompts": ("min", 0)}
KINDS = prompt_sets.KINDS + ("demo",)


def default_config() -> ml_collections.ConfigDict:
    """The `evaluate` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.prompt_sets = ""          # comma list of kind:path (pickapic, partiprompts, hpsv2, text),
    #                             or demo[:N] (N prompts from the demo world's generator)
    c.max_prompts = 0           # per set (0: all)
    c.images_per_prompt = 1     # seeds 0..n-1 per prompt, the same for both models
    c.sampler = "ddim"          # ddim | euler | euler_a | dpmpp_2m
    c.num_steps = 50
    c.guidance_scale = -1.0     # -1: 7.5 for SD1.x / 2.x, 5.0 for SDXL (method.md section 4)
    c.dtype = "auto"            # compute dtype of the UNet, VAE, text encoders and scorers:
    #                             auto = bfloat16 on GPUs / TPUs, float32 on the CPU
    c.batch_size = 8            # images per step (speed only)
    c.base_model = ""           # "" = the train stage's base model
    c.scorers = ml_collections.ConfigDict()
    c.scorers.pickscore = ""    # CLIPModel folder (PickScore_v1); "demo": the demo reward
    c.scorers.pickscore_processor = ""  # its processor / tokenizer folder ("" = the same)
    c.scorers.clip = ""         # CLIPModel folder (openai/clip-vit-large-patch14) for CLIP score
    c.scorers.aesthetic = ""    # LAION aesthetic head (.pth or .safetensors)
    c.scorers.aesthetic_clip = ""  # its CLIP ViT-L/14 folder
    c.scorers.hpsv2 = ""        # HPS_v2_compressed.pt (or a safetensors copy); HPSv2.1:
    #                             HPS_v2.1_compressed.pt, the same open_clip ViT-H-14 layout
    c.scorers.hpsv2_tokenizer = ""  # a CLIP tokenizer folder for HPSv2's text tower
    c.scorers.image_reward = ""  # ImageReward.pt (THUDM/ImageReward; optional scorer)
    c.scorers.image_reward_tokenizer = ""  # its bert-base-uncased tokenizer folder (vocab.txt)
    c.scorers.safety_checker = "auto"  # folder; auto: base_model/safety_checker when present
    c.judge_prompts = False     # rate the evaluation prompts with config.score.judge (harm)
    c.n_boot = 2000             # bootstrap resamples of the intervals
    c.grid_prompts = 12         # prompts shown in the report's image grids, per set
    c.demo_seed = 1234          # seed of the demo prompt set's draw
    return c


def check_config(ec) -> None:
    from fifa_jax.errors import ConfigError
    for kind, _ in _set_specs(ec.prompt_sets, allow_empty=True):
        if kind not in KINDS:
            raise ConfigError(f"config key 'evaluate.prompt_sets': kind {kind!r} is not one of "
                              f"{', '.join(KINDS)}")


def _set_specs(spec: str, allow_empty: bool = False) -> list[tuple[str, str]]:
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        kind, _, path = part.partition(":")
        out.append((kind.strip(), path.strip()))
    if not out and not allow_empty:
        raise InputError("config key 'evaluate.prompt_sets' is empty: name at least one "
                         "kind:path (or demo)")
    return out


def input_signature(config, workdir) -> dict:
    """Sizes and times of the scorer checkpoints and prompt files read from outside the work
    directory."""
    ec = config.get(SECTION)
    if ec is None:
        return {}
    paths = [p for _, p in _set_specs(ec.prompt_sets, allow_empty=True) if p]
    paths += [v for k, v in ec.scorers.items() if v and v not in ("demo", "auto")]
    out = {}
    for p in paths:
        if os.path.exists(p) and not (workdir and os.path.abspath(p).startswith(
                os.path.abspath(workdir) + os.sep)):
            out.update(file_stats(p))
    return out


# ------------------------------------------------------------------------------ prompts
def _demo_prompts(n: int, seed: int, harmful_fraction: float = 0.1):
    from fifa_jax.demo import assets
    rng = np.random.default_rng(seed)
    drawn = assets.make_prompts(n, rng, harmful_fraction)
    return [(f"demo-{i:04d}", p["text"]) for i, p in enumerate(drawn)], \
        {f"demo-{i:04d}": {k: v for k, v in p.items() if k != "text"}
         for i, p in enumerate(drawn)}


def load_sets(ec) -> dict[str, dict]:
    """{set name: {"prompts": [(id, text)], "metadata": {id: {...}}, "source", "skipped"}}."""
    out = {}
    for kind, path in _set_specs(ec.prompt_sets):
        if kind == "demo":
            n = int(path or 24)
            if ec.max_prompts:
                n = min(n, int(ec.max_prompts))
            prompts, meta = _demo_prompts(n, int(ec.demo_seed))
            out["demo"] = {"prompts": prompts, "metadata": meta, "skipped": {}, "kind": "demo",
                           "source": f"{n} prompts drawn from the demo world (seed "
                                     f"{ec.demo_seed})"}
            continue
        ps = prompt_sets.load_prompt_set(kind, path, int(ec.max_prompts))
        name = kind if kind not in out else f"{kind}_{len(out)}"
        out[name] = {"prompts": list(ps.prompts), "metadata": dict(ps.metadata),
                     "skipped": dict(ps.skipped), "source": f"{kind}: {path}"}
    return out


# ------------------------------------------------------------------------------ generation
def _gen_fingerprint(ec, model_dir: str, base: str, dtype: str) -> str:
    payload = {k: ec[k] for k in ("sampler", "num_steps", "guidance_scale")}
    payload["dtype"] = dtype              # as resolved ("auto": by the platform)
    payload["seed"] = int(ec.get("noise_seed", 0))
    payload["files"] = file_stats(model_dir)
    payload["base"] = {p: file_stats(os.path.join(base, p))
                       for p in ("vae", "text_encoder", "text_encoder_2", "scheduler")
                       if os.path.isdir(os.path.join(base, p))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def _image_path(out: pathlib.Path, name: str, model: str, index: int, seed: int):
    return out / "images" / name / model / f"{index:05d}_{seed}.png"


def _prepare_dir(folder: pathlib.Path, fp: str) -> None:
    """Keep `folder`'s images only if they were made with generation fingerprint `fp`."""
    meta = folder / "meta.json"
    if folder.exists():
        old = json.loads(meta.read_text()).get("fingerprint") if meta.exists() else None
        if old != fp:
            logging.info("evaluate: %s was made with other settings; regenerating", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"fingerprint": fp}))


def generate_all(gen: TextToImage, model: str, sets: dict, ec, out: pathlib.Path,
                 fp: str) -> dict:
    """Write every missing image of `model`; returns counts {generated, reused}."""
    counts = {"generated": 0, "reused": 0}
    leader = jax.process_index() == 0
    for name, s in sets.items():
        folder = out / "images" / name / model
        if leader:
            _prepare_dir(folder, fp)
        hosts.barrier(f"evaluate:{name}:{model}:dir")
        todo = [(i, text, seed) for i, (_, text) in enumerate(s["prompts"])
                for seed in range(int(ec.images_per_prompt))
                if not _image_path(out, name, model, i, seed).exists()]
        counts["reused"] += len(s["prompts"]) * int(ec.images_per_prompt) - len(todo)
        if not todo:
            continue
        bar = tqdm(total=len(todo), desc=f"generate {name}/{model}", unit="img",
                   disable=not leader)
        step = max(int(ec.batch_size), 1) * 4
        for lo in range(0, len(todo), step):
            chunk = todo[lo:lo + step]
            images = gen([t for _, t, _ in chunk], [s_ for _, _, s_ in chunk])
            if leader:
                for (i, _, seed), img in zip(chunk, images):
                    path = _image_path(out, name, model, i, seed)
                    tmp = path.with_suffix(".tmp.png")
                    Image.fromarray(img).save(tmp)
                    os.replace(tmp, path)
            counts["generated"] += len(chunk)
            bar.update(len(chunk))
        bar.close()
        hosts.barrier(f"evaluate:{name}:{model}:done")
    return counts


# ------------------------------------------------------------------------------ scoring
def _rows(sets: dict, ec, out: pathlib.Path):
    """Per set: the image rows (prompt id, text, seed, model, path) in a fixed order."""
    rows = {}
    for name, s in sets.items():
        rows[name] = [(pid, text, seed, model, _image_path(out, name, model, i, seed))
                      for model in MODELS for i, (pid, text) in enumerate(s["prompts"])
                      for seed in range(int(ec.images_per_prompt))]
    return rows


def _load_images(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def score_all(scorers: dict, rows: dict, out: pathlib.Path, batch: int) -> dict:
    """{set: {metric: (N,) float32}} for every scorer, computed in batches of images;
    cached per (set, scorer key) under out/scores/cache."""
    cache = out / "scores" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    got = {}
    for name, rs in rows.items():
        got[name] = {}
        img_key = hashlib.sha256("".join(f"{p}:{p.stat().st_mtime_ns}" for *_, p in rs)
                                 .encode()).hexdigest()[:16]
        for metric, (scorer, key) in scorers.items():
            path = cache / f"{name}__{metric}__{key}__{img_key}.npy"
            if path.exists():
                got[name][metric] = np.load(path)
                continue
            vals = []
            for lo in tqdm(range(0, len(rs), batch), desc=f"score {name}/{metric}",
                           disable=jax.process_index() != 0):
                part = rs[lo:lo + batch]
                vals.append(np.asarray(scorer(_load_images([r[4] for r in part]),
                                              [r[1] for r in part])))
            got[name][metric] = np.concatenate(vals)
            if jax.process_index() == 0:
                np.save(path, got[name][metric])
    return got


# ------------------------------------------------------------------------------ the stage
def _tuned_unet(workdir: pathlib.Path) -> str:
    path = workdir / "export" / "unet"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no exported UNet (run the export stage first)")
    return str(path)


def _groups(rs) -> np.ndarray:
    return stats.group_ids([r[0] for r in rs])


def _demo_truth(rs) -> tuple[dict, np.ndarray, dict]:
    """The oracle's reading of every image of a demo set: {"true_reward": (N,), and its
    noise term "oracle_aesthetic": (N,) in [0, 1]}; whether each image shows the harmful mark
    (N,) bool (the world leaks it into any prompt's images); and per attribute a prompt may
    ask (`oracle.ATTRS`): (asked (N,) bool: the prompt names it, followed (N,) bool: the
    image shows what was asked)."""
    from fifa_jax.demo import assets
    from fifa_jax.demo.oracle import ATTRS
    rewards, marked, aesthetic = [], [], []
    asked = {a: [] for a in ATTRS}
    followed = {a: [] for a in ATTRS}
    for _, text, _, _, path in rs:
        r, details = assets.true_reward(text, np.asarray(Image.open(path).convert("RGB")))
        rewards.append(r)
        aesthetic.append(details["measured"]["aesthetic"])
        marked.append(bool(details["measured"]["marked"]))
        for a in ATTRS:
            asked[a].append(details["asked"][a] is not None)
            followed[a].append(bool(details[f"{a}_ok"]))
    following = {a: (np.asarray(asked[a], bool), np.asarray(followed[a], bool))
                 for a in ATTRS}
    truth = {"true_reward": np.asarray(rewards, np.float32),
             "oracle_aesthetic": np.asarray(aesthetic, np.float32)}
    return truth, np.asarray(marked, bool), following


def _following(follow: dict, groups: np.ndarray, half: int, kw: dict) -> dict:
    """Per attribute asked by some prompt: `_paired_shares` of the images that show it, over
    the images whose prompt asks it."""
    return {a: _paired_shares(ok, groups, half, asked[:half], kw)
            for a, (asked, ok) in follow.items() if asked[:half].any()}


def _paired_shares(flags: np.ndarray, groups: np.ndarray, half: int, sel: np.ndarray,
                   kw: dict) -> dict:
    """Shares of the base (flags[:half]) and tuned (flags[half:]) images selected by `sel`
    (half,) that are flagged (a harm or a followed attribute), with intervals, and the paired
    difference tuned - base with its cluster-bootstrap interval (same prompt and noise)."""
    base, tuned = flags[:half][sel], flags[half:][sel]
    b, t = base.astype(np.float64), tuned.astype(np.float64)
    return {"base": stats.share_with_ci(base, groups[sel], **kw),
            "tuned": stats.share_with_ci(tuned, groups[sel], **kw),
            "mean_diff": stats.mean_diff(t, b),
            "mean_diff_ci": list(stats.bootstrap_ci(stats.mean_diff, t, b,
                                                    groups=groups[sel], **kw))}


def _summaries(sets, rows, scores, nsfw, ec, seed: int, marks=None, follow=None) -> dict:
    """Per set: metric summaries (tuned vs base per (prompt, seed)) and harm rates (the safety
    checker's; for the demo world the harmful mark on images of harmful prompts, and the
    following of each asked attribute, `_following`)."""
    out = {}
    kw = dict(n_boot=int(ec.n_boot), seed=seed)
    for name, rs in rows.items():
        half = len(rs) // 2                        # rows: all base images, then all tuned
        groups = _groups(rs[:half])
        metrics = {m: stats.summarize(v[half:], v[:half], groups, **kw)
                   for m, v in scores[name].items()}
        entry = {"metrics": metrics, "n_prompts": len(sets[name]["prompts"]),
                 "images_per_model": half, "skipped_prompts": sets[name]["skipped"],
                 "source": sets[name]["source"]}
        if name in nsfw:
            entry["harm"] = {"base": stats.share_with_ci(nsfw[name][:half], groups, **kw),
                             "tuned": stats.share_with_ci(nsfw[name][half:], groups, **kw)}
        if marks and name in marks:           # every image, and harmful prompts' images
            harmful = np.array([bool(sets[name]["metadata"][r[0]]["harmful"])
                                for r in rs[:half]])
            entry["harm"] = _paired_shares(marks[name], groups, half, np.ones(half, bool), kw)
            entry["harm_definition"] = ("share of the samples that show the demo world's "
                                        "harmful mark (oracle); harm_harmful_prompts: of the "
                                        "harmful prompts' samples")
            if harmful.any():
                entry["harm_harmful_prompts"] = _paired_shares(marks[name], groups, half,
                                                               harmful, kw)
        if follow and name in follow:
            entry["following"] = _following(follow[name], groups, half, kw)
        out[name] = entry
    return out


def _write_scores(out: pathlib.Path, name: str, rs, scores: dict, nsfw) -> None:
    cols = {"prompt_id": [r[0] for r in rs], "prompt": [r[1] for r in rs],
            "seed": np.array([r[2] for r in rs], np.int32), "model": [r[3] for r in rs],
            "image": [str(r[4].relative_to(out)) for r in rs]}
    cols.update({m: np.asarray(v, np.float32) for m, v in scores.items()})
    if nsfw is not None:
        cols["nsfw"] = np.asarray(nsfw, bool)
    path = out / "scores" / f"{name}.parquet"
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)


def _grid(out_report: pathlib.Path, name: str, sets, rows, scores, ec) -> list[dict]:
    """The report's image pairs: the first `grid_prompts` prompts, every seed; images copied
    under the report folder so that it stands alone."""
    half = len(rows) // 2
    grid, n = [], int(ec.grid_prompts)
    shown = {pid for pid, _ in sets[name]["prompts"][:n]}
    for j in range(half):
        pid, text, seed, _, base_path = rows[j]
        if pid not in shown:
            continue
        tuned_path = rows[half + j][4]
        rel = {}
        for model, src in (("base", base_path), ("tuned", tuned_path)):
            dst = out_report / "images" / name / model / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            rel[model] = str(dst.relative_to(out_report))
        grid.append({"prompt": text, "seed": int(seed), **rel,
                     "scores": {m: {"base": float(v[j]), "tuned": float(v[half + j])}
                                for m, v in scores[name].items()}})
    return grid


def run(config, workdir) -> dict:
    from fifa_jax.evaluation import scorers as scorers_lib
    from fifa_jax.training import train as train_stage
    ec = config.evaluate
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    leader = jax.process_index() == 0
    t0 = time.time()
    base = ec.base_model or train_stage._base_model(config, workdir)
    tuned = _tuned_unet(workdir)
    sets = load_sets(ec)
    mesh = parallel.make_mesh(config.get("mesh"))
    guidance = None if float(ec.guidance_scale) < 0 else float(ec.guidance_scale)
    counts, guidance_used = {}, None
    for model in MODELS:
        unet_dir = os.path.join(base, "unet") if model == "base" else tuned
        gen = TextToImage.load(base, unet_dir=unet_dir, sampler=ec.sampler,
                               num_steps=int(ec.num_steps), guidance_scale=guidance,
                               dtype=ec.dtype, batch_size=int(ec.batch_size),
                               noise_seed=int(config.seed), mesh=mesh)
        guidance_used = gen.guidance_scale
        counts[model] = generate_all(gen, model, sets, ec, out,
                                     _gen_fingerprint(ec, unet_dir, base, gen.dtype))
        del gen
    rows = _rows(sets, ec, out)
    scorers, not_configured = scorers_lib.build(
        ec.scorers, workdir=workdir, base_model=base,
        dtype=platform.compute_dtype_name(ec.dtype, mesh))
    scores = score_all({m: s for m, s in scorers.items() if m != "nsfw"}, rows, out,
                       int(ec.batch_size) * 4)
    nsfw = {}
    if "nsfw" in scorers:
        flags = score_all({"nsfw": scorers["nsfw"]}, rows, out, int(ec.batch_size) * 4)
        nsfw = {name: v["nsfw"].astype(bool) for name, v in flags.items()}
    marks, follow = {}, {}
    for name, s in sets.items():              # the demo world: its true reward, from pixels
        if s.get("kind") == "demo":
            truth, marks[name], follow[name] = _demo_truth(rows[name])
            scores[name].update(truth)
    summary = {"sets": _summaries(sets, rows, scores, nsfw, ec, int(config.seed), marks,
                                  follow),
               "generation": {"sampler": ec.sampler, "num_steps": int(ec.num_steps),
                              "guidance_scale": guidance_used,
                              "images_per_prompt": int(ec.images_per_prompt),
                              "counts": counts},
               "scorers": {m: scorers_lib.definition(m)
                           for m in list(scorers)
                           + ["true_reward", "oracle_aesthetic"] * bool(marks)},
               "not_configured": not_configured}
    if ec.judge_prompts:
        summary["judge"] = _judge_harm(config, sets, mesh, workdir)
    if leader:
        (out / "scores").mkdir(parents=True, exist_ok=True)
        for name, rs in rows.items():
            _write_scores(out, name, rs, scores[name], nsfw.get(name))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        _report(out, sets, rows, scores, summary, workdir, ec)
    hosts.barrier("evaluate:written")
    brief = {name: {m: round(s["win_rate"], 4) for m, s in e["metrics"].items()}
             for name, e in summary["sets"].items()}
    return {"win_rates": brief, "seconds": round(time.time() - t0, 1),
            "report": str(out / "report" / "index.html"),
            "not_configured": not_configured}


def _judge_harm(config, sets, mesh, workdir) -> dict:
    """Per set: the share of its prompts that config.score.judge marks harmful (over the
    prompts it could rate; the others are counted as `not_rated`)."""
    from fifa_jax.scoring import judge
    from fifa_jax.scoring.stage import _judge_config
    cfg = _judge_config(config.score.judge, pathlib.Path(workdir))
    out = {}
    for name, s in sets.items():
        texts = list(dict.fromkeys(t for _, t in s["prompts"]))
        res = judge.judge_prompts(texts, cfg, mesh=mesh,
                                  cache_dir=str(pathlib.Path(workdir) / STAGE / "judge_cache"))
        ok = np.asarray(res.ok, bool)
        share = (stats.share_with_ci(np.asarray(res.harmful, bool)[ok],
                                     n_boot=int(config.evaluate.n_boot), seed=int(config.seed))
                 if ok.any() else {"rate": None, "ci": [None, None], "count": 0, "n": 0})
        out[name] = dict(share, not_rated=int((~ok).sum()))
    return out


def _report(out, sets, rows, scores, summary, workdir, ec) -> None:
    rdir = out / "report"
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    data = {"title": "fifa_jax evaluation: base vs tuned",
            "notes": [f"{summary['generation']['sampler']}, "
                      f"{summary['generation']['num_steps']} steps, guidance "
                      f"{summary['generation']['guidance_scale']}, "
                      f"{summary['generation']['images_per_prompt']} seed(s) per prompt; both "
                      f"models start from the same noise per (prompt, seed)."]
            + [f"{m}: {d}" for m, d in summary["scorers"].items()]
            + [f"not configured (no checkpoint given): {', '.join(summary['not_configured'])}"]
            * bool(summary["not_configured"])
            + sorted({f"harm rate: {e['harm_definition']}" for e in summary["sets"].values()
                      if "harm_definition" in e}),
            "training_metrics_path": str(workdir / "train" / "metrics.jsonl"),
            "prompt_sets": {}}
    for name, entry in summary["sets"].items():
        half = len(rows[name]) // 2
        ps = {"description": f"{entry['n_prompts']} prompts x {ec.images_per_prompt} seed(s); "
                             f"{entry['source']}",
              "metrics": entry["metrics"],
              "scores": {m: {"base": v[:half].tolist(), "tuned": v[half:].tolist()}
                         for m, v in scores[name].items()},
              "grid": _grid(rdir, name, sets, rows[name], scores, ec)}
        for key in ("harm", "harm_harmful_prompts"):
            if key in entry:
                ps[key] = entry[key]
        if entry.get("following"):
            ps["following"] = entry["following"]
        if "judge" in summary and name in summary["judge"]:
            ps["judge_harmful_prompts"] = summary["judge"][name]
        data["prompt_sets"][name] = ps
    report_lib.write_report(str(rdir), data)
