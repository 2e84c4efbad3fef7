"""The heavy jitted programs of each stage, built abstractly from model config files alone.

    programs = stage_programs(config, mesh, knn_rows=59_000)   # [Program], config.stages' order
    lowered = programs[0].lower()                              # under jax.set_mesh(mesh)

Every program is the stage's own jitted function (the same builders the stages call:
`train_step` / `eval_step` with the trainer's shardings, `make_encode_step`, the encode
stage's text step, `make_score_step`, the k-NN `_build`, `make_denoise`) applied to
ShapeDtypeStructs that carry the shapes and shardings the config implies. Models are made with
ShapeDtypeStruct parameters from `config.json` (UNet, VAE, text encoders, the CLIP reward),
the noise schedule from `scheduler/scheduler_config.json`: no weights, tokenizer or data files
are read.

Stage -> programs:
  score:    score_step (the reward's image tower and score on `score.reward.batch_size` images
            a chip), score_text (its text tower on as many prompts a chip)
  select:   knn (the tiled, sharded exact k-NN over `knn_rows` prompt embeddings)
  encode:   encode_vae (posteriors of `encode.batch_size` images a chip, with the mirrored
            copies when `encode.random_flip`), encode_text[_2] (each text encoder)
  train:    train_step (one update: grad_accum micro-batches of train.batch_size pairs),
            or with train.accumulate "host" train_micro_step (one micro-batch added into the
            gradient buffer; it takes the whole state, so its memory counts every resident
            buffer) and train_update; eval_step (one held-out micro-batch)
  evaluate: sample (the whole sampler loop with classifier-free guidance over
            `evaluate.batch_size` images), vae_decode
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fifa_jax.dtypes import DTYPES
from fifa_jax.errors import InputError
from fifa_jax.parallel import mesh as mesh_lib
from fifa_jax.parallel import param_sharding

PICKAPIC_PROMPTS = 58_960       # unique Pick-a-Pic v2 train prompts after ingest (about 59k)


@dataclasses.dataclass
class Program:
    """One jitted program and its abstract arguments on a mesh."""
    name: str
    stage: str
    fn: Callable                # a jax.jit-wrapped function
    args: tuple                 # ShapeDtypeStructs (with shardings) / pytrees of them
    mesh: Any
    settings: dict              # the config values that shape it (for the report)
    advice: str                 # the settings to change when it does not fit

    def lower(self):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*self.args)


# ------------------------------------------------------------------------------ helpers
def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype, sharding=sharding)


def _abstract(tree, shardings, dtype=None):
    """ShapeDtypeStructs of `tree`'s leaves (cast to `dtype` when given) with `shardings`."""
    return jax.tree.map(lambda a, s: _sds(a.shape, dtype or a.dtype, s), tree, shardings)


def _replicated_tree(tree, mesh, dtype=None):
    rep = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda a: _sds(a.shape, dtype or a.dtype, rep), tree)


def _batch(mesh, shape, dtype):
    """(B, ...) split over every device along axis 0."""
    return _sds(shape, dtype, mesh_lib.batch_sharding(mesh, len(shape)))


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise InputError(f"{path} not found: the check needs {what}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _section(config, name: str, module):
    """config[name], or the stage's defaults when the config has no such section."""
    if name in config and config[name] is not None:
        return config[name]
    return module.default_config()


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _text_encoders(base: str) -> list[tuple[str, dict, str | None]]:
    """(folder, config.json dict, SDXL role) of each text encoder of a pipeline folder."""
    index = _read_json(os.path.join(base, "model_index.json"),
                       "the base model's model_index.json")
    sdxl = _present(index, "text_encoder_2")
    out = []
    for name, role in (("text_encoder", "first" if sdxl else None), ("text_encoder_2", "second")):
        if _present(index, name):
            path = os.path.join(base, name)
            out.append((path, _read_json(os.path.join(path, "config.json"),
                                         f"{name}/config.json"), role))
    if not out:
        raise InputError(f"{base}/model_index.json names no text_encoder")
    return out


def _text_model(raw: dict, role, dtype, attention_impl: str, source: str):
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
    from fifa_jax.models.clip_config import config_from_dict
    cfg = config_from_dict(raw, source)
    archs = raw.get("architectures") or []
    with_proj = "CLIPTextModelWithProjection" in archs or (not archs and role == "second")
    cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
    return clip_io.build(cfg, cls, dtype=dtype, attention_impl=attention_impl), cfg


def _unet_dir(base: str) -> str:
    return os.path.join(base, "unet")


def _scheduler(base: str) -> dict:
    return _read_json(os.path.join(base, "scheduler", "scheduler_config.json"),
                      "the base model's scheduler/scheduler_config.json")


def _multiple(mesh, value: int, key: str) -> int:
    m = mesh_lib.batch_multiple(mesh)
    if value % m:
        raise InputError(f"config key {key!r} = {value} must be a multiple of the {m} chips "
                         f"of the mesh (the batch is split over them)")
    return value


def _base_models(config) -> dict:
    enc = config.get("encode") or {}
    tr = config.get("train") or {}
    ev = config.get("evaluate") or {}
    encode_base = enc.get("base_model", "") if hasattr(enc, "get") else ""
    train_base = (tr.get("base_model", "") if hasattr(tr, "get") else "") or encode_base
    eval_base = (ev.get("base_model", "") if hasattr(ev, "get") else "") or train_base
    return {"encode": encode_base, "train": train_base, "evaluate": eval_base}


def _need_base(path: str, key: str) -> str:
    if not path:
        raise InputError(f"config key {key!r} is empty: name a diffusers pipeline folder "
                         f"(model_index.json and each component's config.json suffice)")
    if path == "demo":
        raise InputError(f"config key {key!r} is 'demo': the check reads model config files; "
                         f"name a pipeline folder")
    return path


# ------------------------------------------------------------------------------ train
def _latent_geometry(config) -> dict:
    """Latent channels and side, text length and width, pooled width, VAE scaling."""
    from fifa_jax.models.vae import parse_vae_config
    from fifa_jax.training import encode
    ec = _section(config, "encode", encode)
    base = _need_base(_base_models(config)["encode"], "encode.base_model")
    vae_dir = ec.vae_path or os.path.join(base, "vae")
    vae_cfg = parse_vae_config(_read_json(os.path.join(vae_dir, "config.json"),
                                          "the VAE's config.json"))
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    res = int(ec.resolution)
    if res % f:
        raise InputError(f"config key 'encode.resolution' = {res} must be a multiple of the "
                         f"VAE's downsampling factor {f}")
    encoders = _text_encoders(base)
    length = int(encoders[0][1].get("max_position_embeddings", 77))
    width = sum(int(raw.get("hidden_size", 512)) for _, raw, _ in encoders)
    pooled = (int(encoders[-1][1].get("projection_dim", 512))
              if encoders[-1][2] == "second" else None)
    return {"channels": vae_cfg.latent_channels, "side": res // f, "resolution": res,
            "text_len": length, "text_dim": width, "pooled": pooled,
            "scaling_factor": float(vae_cfg.scaling_factor),
            "shift_factor": float(vae_cfg.shift_factor or 0.0)}


def _abstract_unet(base: str, dtype: str, attention_impl: str, remat: str):
    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.unet_io import abstract_unet
    raw = read_config(_unet_dir(base))
    model = abstract_unet(raw, dtype=DTYPES[dtype], attention_impl=attention_impl,
                          remat_policy=None if remat in ("", "none") else remat)
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                          nnx.to_pure_dict(state))
    return model.config, graphdef, params


def train_programs(config, mesh) -> list[Program]:
    from fifa_jax.training import lora as lora_lib
    from fifa_jax.training import noise_schedule
    from fifa_jax.training import train_state as ts
    from fifa_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from fifa_jax.training.train import step_config
    from fifa_jax.training.train_step import (eval_step, micro_step, train_step, update_step,
                                              zero_grads, zero_sums)
    from fifa_jax.training.trainer import step_batch_sharding, unet_apply
    tc = config.train
    base = _need_base(_base_models(config)["train"], "train.base_model")
    geo = _latent_geometry(config)
    unet_cfg, graphdef, params = _abstract_unet(base, tc.dtype, tc.attention_impl, tc.remat)
    dims = unet_cfg.cross_attention_dim
    if any(int(d) != geo["text_dim"] for d in dims):
        raise InputError(f"{_unet_dir(base)}/config.json: cross_attention_dim={dims} but the "
                         f"text encoders give {geo['text_dim']} features")
    sched_path = os.path.join(base, "scheduler", "scheduler_config.json")
    schedule = noise_schedule.from_scheduler_config(_scheduler(base), sched_path,
                                                    tc.prediction_type or None)
    rules = param_sharding.rules_from_config(config.get("mesh") or {})
    tactic = (config.get("mesh") or {}).get("param_tactic", "fsdp")
    shard_fn = functools.partial(param_sharding.param_shardings, mesh=mesh, rules=rules)
    state_fn = functools.partial(param_sharding.param_shardings, mesh=mesh,
                                 rules=param_sharding.state_rules_from_config(
                                     config.get("mesh") or {}))
    replicated = mesh_lib.replicated(mesh)
    optimizer = make_optimizer(tc)
    lora = lora_lib.from_config(tc.get("lora"))
    policy_fn = None
    if lora is None:
        abstract_state, state_sh = ts.state_shardings(params, optimizer, shard_fn, replicated,
                                                      state_fn)
        grad_sh = state_fn(params)
    else:                   # the state is the adapters (replicated), as in Trainer
        adapters = jax.eval_shape(functools.partial(lora_lib.init_adapters, params, lora,
                                                    lora_lib.init_key(0)))
        abstract_state, state_sh = ts.state_shardings(
            adapters, optimizer, lambda t: jax.tree.map(lambda _: replicated, t), replicated)
        policy_fn = functools.partial(lora_lib.merge, scale=lora.scale)
        grad_sh = state_sh.params
    state = _abstract(abstract_state, state_sh)
    ref = _abstract(params, shard_fn(params), dtype=DTYPES[tc.ref_dtype])
    b = _multiple(mesh, int(tc.batch_size), "train.batch_size")
    a = int(tc.grad_accum)
    c, h, ln, d = geo["channels"], geo["side"], geo["text_len"], geo["text_dim"]

    def batch(accum):
        shapes = {"moments_w": (accum, b, 2 * c, h, h), "moments_l": (accum, b, 2 * c, h, h),
                  "prompt_embeds": (accum, b, ln, d), "weights": (accum, b)}
        if geo["pooled"]:
            shapes["pooled"] = (accum, b, geo["pooled"])
        return {k: _sds(s, jnp.float32, step_batch_sharding(mesh, len(s)))
                for k, s in shapes.items()}

    consts = {"empty_embeds": _sds((ln, d), jnp.float32, replicated)}
    if geo["pooled"]:
        consts["empty_pooled"] = _sds((geo["pooled"],), jnp.float32, replicated)
        consts["time_ids"] = _sds((6,), jnp.float32, replicated)
    step_cfg = step_config(tc, geo["scaling_factor"], geo["shift_factor"])
    unet_fn = unet_apply(graphdef)
    lr_fn = learning_rate_schedule(float(tc.learning_rate), int(tc.warmup_steps))
    evaluate = jax.jit(functools.partial(eval_step, unet_fn=unet_fn, schedule=schedule,
                                         cfg=step_cfg, policy_fn=policy_fn),
                       out_shardings=replicated)
    n = mesh_lib.batch_multiple(mesh)
    settings = {"pairs_per_micro_batch": b, "pairs_per_chip": b / n, "grad_accum": a,
                "effective_batch": a * b, "latent": [c, h, h], "text": [ln, d],
                "dtype": tc.dtype, "ref_dtype": tc.ref_dtype, "remat": tc.remat,
                "optimizer": tc.optimizer, "mesh": dict(mesh.shape),
                "param_tactic": tactic, "accumulate": tc.get("accumulate", "scan"),
                "lora_rank": lora.rank if lora else 0}
    advice = train_advice(b, a, n, int(mesh.devices.size), tc.remat, int(mesh.shape["fsdp"]),
                          tactic, tc.ref_dtype)
    key = _sds((2,), jnp.uint32, replicated)
    index = _sds((), jnp.uint32, replicated)
    if tc.get("accumulate", "scan") == "scan":
        step = jax.jit(functools.partial(train_step, unet_fn=unet_fn, optimizer=optimizer,
                                         schedule=schedule, cfg=step_cfg, lr_fn=lr_fn,
                                         policy_fn=policy_fn),
                       donate_argnums=(0,), out_shardings=(state_sh, replicated))
        steps = [Program("train_step", "train", step, (state, ref, batch(a), consts), mesh,
                         settings, advice)]
    else:       # the Trainer's accumulate="host" programs: A micro-steps, then the update
        grads = _abstract(jax.eval_shape(zero_grads, abstract_state.params), grad_sh)
        sums = _replicated_tree(jax.eval_shape(zero_sums), mesh)
        micro = jax.jit(functools.partial(micro_step, unet_fn=unet_fn, schedule=schedule,
                                          cfg=step_cfg, policy_fn=policy_fn),
                        donate_argnums=(1, 2), keep_unused=True,
                        out_shardings=(grad_sh, replicated))
        update = jax.jit(functools.partial(update_step, a=a, optimizer=optimizer,
                                           lr_fn=lr_fn),
                         donate_argnums=(0,), out_shardings=(state_sh, replicated))
        steps = [Program("train_micro_step", "train", micro,
                         (state, grads, sums, ref, batch(1), consts, index), mesh, settings,
                         advice),
                 Program("train_update", "train", update, (state, grads, sums), mesh,
                         settings, advice)]
    return steps + [
            Program("eval_step", "train", evaluate,
                    (state.params, ref, batch(1), consts, key, index), mesh,
                    dict(settings, grad_accum=1, effective_batch=b), advice)]


# ------------------------------------------------------------------------------ encode
def encode_programs(config, mesh) -> list[Program]:
    from fifa_jax.models.vae_io import abstract_vae
    from fifa_jax.training import encode
    ec = _section(config, "encode", encode)
    base = _need_base(ec.base_model, "encode.base_model")
    vae_dir = ec.vae_path or os.path.join(base, "vae")
    vae = abstract_vae(_read_json(os.path.join(vae_dir, "config.json"), "the VAE's config.json"),
                       dtype=DTYPES[ec.vae_dtype], attention_impl=ec.attention_impl)
    state, step = encode.make_encode_step(vae, bool(ec.random_flip), DTYPES[ec.dtype])
    n = mesh_lib.batch_multiple(mesh)
    bs = int(ec.batch_size) * n
    res = int(ec.resolution)
    out = [Program("encode_vae", "encode", step,
                   (_replicated_tree(state, mesh), _batch(mesh, (bs, res, res, 3), jnp.uint8)),
                   mesh, {"images_per_chip": int(ec.batch_size) * (2 if ec.random_flip else 1),
                          "resolution": res, "vae_dtype": ec.vae_dtype, "mesh": dict(mesh.shape)},
                   f"lower encode.batch_size ({ec.batch_size} images a chip) or set "
                   f"encode.vae_dtype=bfloat16 (now {ec.vae_dtype})")]
    for i, (path, raw, role) in enumerate(_text_encoders(base)):
        model, cfg = _text_model(raw, role, DTYPES[ec.text_dtype], ec.attention_impl,
                                 os.path.join(path, "config.json"))
        graphdef, tstate = nnx.split(model)
        fn = encode._text_step(graphdef, role, DTYPES[ec.dtype])
        length = int(cfg.max_position_embeddings)
        out.append(Program("encode_text" + (f"_{i + 1}" if i else ""), "encode", fn,
                           (_replicated_tree(tstate, mesh), _batch(mesh, (bs, length), jnp.int32)),
                           mesh, {"prompts_per_chip": int(ec.batch_size), "text_len": length,
                                  "text_dtype": ec.text_dtype, "mesh": dict(mesh.shape)},
                           f"lower encode.batch_size ({ec.batch_size} prompts a chip)"))
    return out


# ------------------------------------------------------------------------------ score
def _reward(rc):
    from fifa_jax.models.clip_config import CLIPConfig, read_config
    from fifa_jax.scoring import preprocess as pp
    if not rc.path or rc.path == "demo":
        raise InputError("config key 'score.reward.path' must name a CLIP-layout reward folder "
                         "(its config.json suffices)")
    cfg, _ = read_config(rc.path)
    if not isinstance(cfg, CLIPConfig):
        raise InputError(f"{rc.path}/config.json: the reward must be a dual CLIPModel config")
    proc = rc.get("processor_path", "") or rc.path
    if os.path.exists(os.path.join(proc, "preprocessor_config.json")):
        image_cfg = pp.load_config(proc)
    else:               # the vision tower's own input size
        side = int(cfg.vision_config.image_size)
        image_cfg = pp.ImageProcessorConfig(shortest_edge=side, crop_hw=(side, side))
    return cfg, image_cfg


def score_programs(config, mesh) -> list[Program]:
    from fifa_jax.models import clip_io
    from fifa_jax.models.clip import CLIPModel
    from fifa_jax.scoring import score_step as ss
    from fifa_jax.scoring import stage as score_stage
    from fifa_jax.scoring.embeddings import text_tower_features
    rc = _section(config, "score", score_stage).reward
    cfg, image_cfg = _reward(rc)
    dtype = DTYPES[rc.dtype]
    model = clip_io.build(cfg, CLIPModel, dtype=dtype,
                          attention_impl=rc.get("attention_impl", "auto"))
    state, step = ss.make_score_step(model, image_cfg, None)
    if dtype != jnp.float32:
        state = jax.eval_shape(lambda s: ss.cast_matrices(s, dtype), state)
    n = mesh_lib.batch_multiple(mesh)
    bs = int(rc.batch_size) * n
    h, w = image_cfg.out_hw
    proj = int(cfg.projection_dim)
    graphdef, tstate = nnx.split(model)

    @jax.jit
    def text_step(state, ids, mask):
        return ss.l2_normalize(text_tower_features(nnx.merge(graphdef, state), ids, mask))

    length = int(cfg.text_config.max_position_embeddings)
    settings = {"images_per_chip": int(rc.batch_size), "image": [h, w], "dtype": rc.dtype,
                "vision_layers": cfg.vision_config.num_hidden_layers,
                "vision_width": cfg.vision_config.hidden_size, "mesh": dict(mesh.shape)}
    return [Program("score_step", "score", step,
                    (_replicated_tree(state, mesh), _batch(mesh, (bs, h, w, 3), jnp.uint8),
                     _batch(mesh, (bs, proj), jnp.float32)), mesh, settings,
                    f"lower score.reward.batch_size ({rc.batch_size} images a chip) or set "
                    f"score.reward.dtype=bfloat16 (now {rc.dtype})"),
            Program("score_text", "score", text_step,
                    (_replicated_tree(tstate, mesh), _batch(mesh, (bs, length), jnp.int32),
                     _batch(mesh, (bs, length), jnp.int32)), mesh,
                    {"prompts_per_chip": int(rc.batch_size), "text_len": length,
                     "mesh": dict(mesh.shape)},
                    f"lower score.reward.batch_size ({rc.batch_size} prompts a chip)")]


# ------------------------------------------------------------------------------ select
def knn_program(config, mesh, rows: int) -> Program:
    """The k-NN of the select stage over `rows` prompt embeddings of the embedder's width,
    with the tile and candidate count `knn.knn` would choose for the mesh."""
    import importlib
    knn_lib = importlib.import_module("fifa_jax.selection.knn")  # the package exports knn()
    from fifa_jax.selection import stage as select_stage
    from fifa_jax.scoring import stage as score_stage
    sel = _section(config, "select", select_stage)
    sc = _section(config, "score", score_stage)
    if sc.embedder.kind == "bert":
        d = 384                     # all-MiniLM-L6-v2 sentence embeddings
    else:                           # the CLIP text tower's projection (the reward's by default)
        from fifa_jax.models.clip_config import read_config
        path = sc.embedder.path or sc.reward.path
        if not path or path == "demo":
            raise InputError("config keys 'score.embedder.path' and 'score.reward.path' are "
                             "empty: the k-NN check needs the embedder's config.json")
        cfg, _ = read_config(path)
        d = int(getattr(cfg, "projection_dim", 512))
    n, k = int(rows), int(sel.knn_k)
    exact = bool(sel.get("knn_exact_f32", True))
    margin = 2 if exact else 5
    direct = d <= 8
    n_dev = mesh.size
    tile0 = int(sel.get("knn_tile", 0) or 0) or 8192          # the accelerator default
    ntiles = -(-n // max(tile0, 2 * (k + 1 + margin)))
    tile = -(-n // ntiles)
    tile = knn_lib._round_up(tile, 128 if tile >= 1024 else 8)
    ntd = -(-(-(-n // tile)) // n_dev)
    kc = min(k + 1 + margin, tile)
    nt = ntd * n_dev
    n_pad = nt * tile
    table = knn_lib._pair_table(nt, n_dev)
    group = knn_lib._group_size(tile, kc, 16)
    fn = knn_lib._build(n_pad, d, k, kc, tile, exact or direct, direct, group, mesh)
    rep = NamedSharding(mesh, P())
    args = (_sds((n_pad, d), jnp.float32, rep), _sds((d,), jnp.float32, rep),
            _sds(table.shape, table.dtype, NamedSharding(mesh, P(tuple(mesh.axis_names)))),
            _sds((), jnp.int32, rep))
    return Program("knn", "select", fn, args, mesh,
                   {"rows": n, "dim": d, "k": k, "tile": tile, "exact_f32": exact,
                    "mesh": dict(mesh.shape)},
                   f"lower select.knn_tile (tile {tile} now)")


# ------------------------------------------------------------------------------ evaluate
def evaluate_programs(config, mesh) -> list[Program]:
    from fifa_jax.evaluation import stage as eval_stage
    from fifa_jax.models.diffusers_io import read_config
    from fifa_jax.models.vae_io import abstract_vae
    from fifa_jax.sampling.denoise import make_denoise
    from fifa_jax.sampling.pipeline import default_guidance, unet_model_fn
    ev = _section(config, "evaluate", eval_stage)
    base = _need_base(_base_models(config)["evaluate"], "evaluate.base_model")
    # "auto": the sampler's rule for accelerators (bfloat16; float32 only on the CPU)
    dtype_name = "bfloat16" if ev.dtype == "auto" else ev.dtype
    dtype = DTYPES[dtype_name]
    raw = read_config(_unet_dir(base))
    unet_cfg, graphdef, params = _abstract_unet(base, dtype_name, "auto", "none")
    is_sdxl = unet_cfg.addition_embed_type == "text_time"
    size = raw.get("sample_size") or 64
    hs, ws = (size, size) if not isinstance(size, (list, tuple)) else size
    c = unet_cfg.in_channels
    encoders = _text_encoders(base)
    length = int(encoders[0][1].get("max_position_embeddings", 77))
    width = sum(int(r.get("hidden_size", 512)) for _, r, _ in encoders)
    n = mesh_lib.batch_multiple(mesh)
    bs = -(-int(ev.batch_size) // n) * n            # padded to the chips, as the sampler does
    guidance = float(ev.guidance_scale)
    guidance = default_guidance(is_sdxl) if guidance < 0 else guidance

    fn = make_denoise(unet_model_fn(graphdef, is_sdxl), scheduler_config=_scheduler(base),
                      sampler=ev.sampler,
                      num_steps=int(ev.num_steps), guidance_scale=guidance)
    states = _batch(mesh, (bs, length, width), jnp.float32)
    if is_sdxl:
        pooled = int(encoders[-1][1].get("projection_dim", 1280))
        ctx = {"encoder_hidden_states": states,
               "text_embeds": _batch(mesh, (bs, pooled), jnp.float32),
               "time_ids": _batch(mesh, (bs, 6), jnp.float32)}
    else:
        ctx = states
    rep = mesh_lib.replicated(mesh)
    key = None
    if ev.sampler == "euler_a":
        k = jax.eval_shape(lambda: jax.random.key(0))
        key = _sds(k.shape, k.dtype, rep)
    args = (_replicated_tree(params, mesh), _batch(mesh, (bs, c, hs, ws), jnp.float32), ctx, ctx,
            key)
    vae_dir = os.path.join(base, "vae")
    vae = abstract_vae(read_config(vae_dir), dtype=dtype, attention_impl="auto")
    vgraph, vstate = nnx.split(vae)

    @jax.jit
    def decode(st, z):
        m = nnx.merge(vgraph, st)
        return m.decode(m.unscale_latents(z))

    common = {"images_per_step": bs, "images_per_chip": bs // n, "latent": [c, hs, ws],
              "dtype": dtype_name, "mesh": dict(mesh.shape)}
    return [Program("sample", "evaluate", fn, args, mesh,
                    dict(common, sampler=ev.sampler, num_steps=int(ev.num_steps),
                         guidance_scale=guidance),
                    f"lower evaluate.batch_size ({ev.batch_size}) or set "
                    f"evaluate.dtype=bfloat16 (now {dtype_name})"),
            Program("vae_decode", "evaluate", decode,
                    (_replicated_tree(vstate, mesh), _batch(mesh, (bs, c, hs, ws), jnp.float32)),
                    mesh, common,
                    f"lower evaluate.batch_size ({ev.batch_size}) or set "
                    f"evaluate.dtype=bfloat16 (now {dtype_name})")]


# ------------------------------------------------------------------------------ all
BUILDERS = {"score": score_programs, "encode": encode_programs, "train": train_programs,
            "evaluate": evaluate_programs}
STAGES_WITH_PROGRAMS = ("score", "select", "encode", "train", "evaluate")


def train_advice(pairs: int, accum: int, batch_devices: int, devices: int, remat: str,
                 fsdp: int, tactic: str, ref_dtype: str) -> str:
    """The train settings that would lower a train program's memory, only those not already
    at their lowest; when none is left, a larger slice."""
    moves = []
    if pairs > batch_devices:
        moves.append(f"lower train.batch_size ({pairs} pairs, {pairs / batch_devices:g} a "
                     f"chip) and raise train.grad_accum ({accum}) to keep the effective batch")
    if remat != "nothing_saveable":
        moves.append(f"set train.remat=nothing_saveable (now {remat})")
    if fsdp < devices:
        moves.append(f"raise mesh.fsdp (now {fsdp}, at most {devices})")
    if tactic != "fsdp":
        moves.append(f"set mesh.param_tactic=fsdp to split the weights too (now {tactic})")
    if ref_dtype != "bfloat16":
        moves.append(f"set train.ref_dtype=bfloat16 (now {ref_dtype})")
    if not moves:
        return (f"every train setting is at its lowest ({pairs / batch_devices:g} pair a "
                f"chip, nothing_saveable, the weights split over all {devices} chips, "
                f"bfloat16 reference): take a slice with more chips or more HBM a chip")
    return moves[0] if len(moves) == 1 else ", ".join(moves[:-1]) + " or " + moves[-1]


def stage_programs(config, mesh, *, knn_rows: int = PICKAPIC_PROMPTS,
                   only: tuple[str, ...] = ()) -> list[Program]:
    """The programs of the stages in `config.stages` (pipeline order); `only`: keep just
    these program names."""
    from fifa_jax import pipeline
    stages = pipeline.parse_stages(config.stages)
    out: list[Program] = []
    for stage in stages:
        if stage == "select":
            out.append(knn_program(config, mesh, knn_rows))
        elif stage in BUILDERS:
            out.extend(BUILDERS[stage](config, mesh))
    if only:
        unknown = set(only) - {p.name for p in out}
        if unknown:
            raise InputError(f"--programs names {sorted(unknown)}, not among the configured "
                             f"stages' programs {[p.name for p in out]}")
        out = [p for p in out if p.name in only]
    return out
