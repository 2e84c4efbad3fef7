"""The export stage: a trained step as a diffusers UNet folder and a whole pipeline folder.

Reads:  train/checkpoints/<step>/params (the latest step, or `export.step`), the base model
        (train.base_model, "" = encode.base_model) for the UNet config and the other
        pipeline components.
Writes (workdir/export/):
  unet/          config.json + diffusion_pytorch_model.safetensors (float32), the optional
                 variants (`export.variants`: fp16, bf16) and, past `export.max_shard_mb`,
                 sharded safetensors with an index (export_io.py)
  pipeline/      the base pipeline's model_index.json and components (hard links) with this
                 unet/: `DiffusionPipeline.from_pretrained("workdir/export/pipeline")` loads it
  lora/pytorch_lora_weights.safetensors   LoRA runs (train.lora.rank > 0): the adapters in
                 the PEFT keys diffusers' `pipe.load_lora_weights("workdir/export/lora")` reads
                 (`unet.<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), alpha / r
                 folded into lora_B: lora.torch_tensors); unet/ and pipeline/ then hold the
                 merged UNet (base + adapters) unless `export.lora_merge` is False (the
                 evaluate stage reads export/unet)
  export_report.json   the step, the files and their sizes

The parameters are restored replicated (every host holds the whole UNet, which it must to
gather it) and process 0 writes; the others wait.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fifa_jax import parallel
from fifa_jax.models.diffusers_io import read_config
from fifa_jax.models.unet_io import abstract_unet
from fifa_jax.parallel import hosts
from fifa_jax.training import checkpoints, export_io, lora as lora_lib, train

STAGE = "export"
SECTION = "export"
CONFIG_KEYS = ("export",)
UPSTREAM = ("train",)
RULES = {"step": ("min", -1), "max_shard_mb": ("min", 0)}
REPORT = "export_report.json"


def default_config() -> ml_collections.ConfigDict:
    """The `export` section of the experiment config."""
    c = ml_collections.ConfigDict()
    c.step = -1            # the checkpoint to export (-1: the latest)
    c.variants = ""        # extra weight copies, comma list of fp16, bf16 (e.g. "fp16")
    c.max_shard_mb = 0     # shard the weights past this size (0: one file per dtype)
    c.pipeline = True      # also write the whole pipeline folder
    c.lora_merge = True    # LoRA runs: also write unet/ (+ pipeline/) with the adapters merged
    return c


def check_config(ec) -> None:
    from fifa_jax.errors import ConfigError
    bad = [v for v in _variants(ec) if v not in export_io.VARIANT_DTYPES]
    if bad:
        raise ConfigError(f"config key 'export.variants' has {bad}; allowed: "
                          f"{', '.join(sorted(export_io.VARIANT_DTYPES))}")


def _variants(ec) -> list[str]:
    return [v.strip() for v in str(ec.variants).split(",") if v.strip()]


def run(config, workdir) -> dict:
    ec = config.export
    workdir = pathlib.Path(workdir)
    out = workdir / STAGE
    base = train._base_model(config, workdir)
    unet_dir = os.path.join(base, "unet")
    unet_config = read_config(unet_dir)
    abstract = nnx.split(abstract_unet(unet_config))[1]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            nnx.to_pure_dict(abstract))
    mesh = parallel.make_mesh(config.get("mesh"))
    lc = lora_lib.from_config(config.train.get("lora"))
    if lc is not None:                  # the checkpoint's params are the adapters
        abstract = jax.eval_shape(functools.partial(
            lora_lib.init_adapters, abstract, lc, lora_lib.init_key(0)))
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    params, step = checkpoints.restore_params(workdir / train.STAGE / train.CKPT_DIR,
                                              None if int(ec.step) < 0 else int(ec.step),
                                              abstract, shardings)
    report = {"step": step, "base_model": base}
    if jax.process_index() == 0:
        write_unet = lc is None or ec.get("lora_merge", True)
        if lc is not None:
            adapters = jax.device_get(params)
            export_io.write_lora(str(out / "lora"), lora_lib.torch_tensors(adapters, lc.scale),
                                 {"rank": str(lc.rank), "alpha": str(lc.alpha)})
            report["lora"] = {"rank": lc.rank, "alpha": lc.alpha, "scale_in_lora_B": lc.scale}
            if write_unet:
                from fifa_jax.models.unet_io import load_unet
                base_params = nnx.to_pure_dict(nnx.state(load_unet(unet_dir), nnx.Param))
                params = lora_lib.merge(adapters, base_params, lc.scale)
        if write_unet:
            graphdef, _ = nnx.split(abstract_unet(unet_config))
            model = nnx.merge(graphdef, jax.device_get(params))
            max_bytes = int(ec.max_shard_mb) * 2 ** 20 or None
            export_io.write_unet_folder(model, unet_config, str(out / "unet"),
                                        variants=_variants(ec), max_shard_bytes=max_bytes)
            if ec.pipeline:
                export_io.write_pipeline_folder(base, str(out / "unet"),
                                                str(out / "pipeline"))
        files = {str(p.relative_to(out)): p.stat().st_size
                 for p in sorted(out.rglob("*")) if p.is_file() and p.name != REPORT}
        report.update(files=files, bytes=sum(files.values()))
        (out / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True))
    hosts.barrier("export:written")
    return {"step": step, "files": len(report.get("files", {})),
            "bytes": report.get("bytes", 0)}
