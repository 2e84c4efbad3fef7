"""One process of the multi-host train check (test_multiprocess.py): the train stage's loop,
checkpoints and resume (`train.fit`) on the tiny UNet, FSDP over every device of every process.

    python -m tests.parallel._fsdp_train_worker WORKDIR SETTINGS_JSON

SETTINGS_JSON: {"seed", "num_steps", "checkpoint_every", "log_every", optional "hang_at",
"signal_at": {"position", "process"} and "lora_rank" (LoRA adapters of that rank, alpha 2)}. The process joins the others through
`fifa_jax.parallel.initialize_distributed` (FIFA_JAX_COORDINATOR / FIFA_JAX_NUM_PROCESSES /
FIFA_JAX_PROCESS_ID; XLA_FLAGS forces the local CPU device count). The mesh is (data 1, fsdp
all devices), so every parameter big enough is split between the processes. The batches are
fixed synthetic pairs by loader position (each process takes its rows of the global batch, as
`PairLoader` does), so a run of the same settings in one process draws the same pairs.

`hang_at`: the loader writes WORKDIR/hang_<process>.txt and sleeps when asked for that position
(the test then kills the processes); `signal_at`: the loader sends SIGTERM to its own process
at that position (one process only: a signal that reached one host). Exit codes: 0 done,
128 + signal when `train.Interrupted`; WORKDIR/result_<process>.json has the summary.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

GLOBAL_BATCH = 4       # pairs per micro-batch over all devices (a multiple of the 4 devices)
FIELDS = ("moments_w", "moments_l", "prompt_embeds")


class SyntheticPairs:
    """The loader's interface for `train.fit`: this process's rows of fixed global batches."""

    def __init__(self, process_index: int, process_count: int, *, hang_at=None,
                 signal_at=None, marker_dir=None):
        self.local = GLOBAL_BATCH // process_count
        self.rows = slice(process_index * self.local, (process_index + 1) * self.local)
        self.process_index = process_index
        self.position = 0
        self.hang_at, self.signal_at, self.marker_dir = hang_at, signal_at, marker_dir

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from tests.training import _tiny
        if self.position == self.hang_at:
            pathlib.Path(self.marker_dir, f"hang_{self.process_index}.txt").write_text(
                str(self.position))
            time.sleep(3600)         # killed by the test
        if self.position == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        flat = _tiny.pairs(GLOBAL_BATCH, seed=1000 + self.position)
        self.position += 1
        return {k: flat[k][self.rows] for k in FIELDS}


def config(settings: dict):
    """The experiment config `train.fit` reads (seed and train section) for `settings`."""
    import ml_collections

    from fifa_jax.training import train
    tc = train.default_config()
    tc.update(num_steps=int(settings["num_steps"]), batch_size=GLOBAL_BATCH, grad_accum=1,
              learning_rate=1e-3, warmup_steps=0, beta=50.0, dtype="float32",
              checkpoint_every=int(settings["checkpoint_every"]),
              log_every=int(settings["log_every"]), keep_checkpoints=10, eval_every=0,
              progress=False)
    tc.lora.rank, tc.lora.alpha = int(settings.get("lora_rank", 0)), 2.0
    return ml_collections.ConfigDict({"seed": int(settings["seed"]), "train": tc})


def abstract_params():
    """The tiny UNet's float32 parameter tree as ShapeDtypeStructs (what the checkpoints hold)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tests.training import _tiny
    state = nnx.state(nnx.eval_shape(_tiny.unet))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        nnx.to_pure_dict(state))


def make_trainer(settings: dict, devices=None):
    """The tiny UNet's `Trainer` for `settings` on a (1, all devices) mesh; `devices` None:
    every process's (joins the distributed job first)."""
    import jax
    import optax

    from fifa_jax import parallel
    from fifa_jax.parallel import hosts, mesh as mesh_lib
    from fifa_jax.training import lora
    from fifa_jax.training.optimizer import learning_rate_schedule
    from fifa_jax.training.train_step import StepConfig
    from fifa_jax.training.trainer import Trainer
    from tests.training import _tiny

    if devices is None:
        parallel.initialize_distributed("on")
        # the first collective between the processes connects them, and on CPU (gloo) it
        # fails when one comes 30 s after the other: meet before the uneven work
        hosts.barrier("worker:joined")
        devices = jax.devices()
    mesh_cfg = mesh_lib.default_config()
    mesh_cfg.data, mesh_cfg.fsdp = 1, -1
    mesh = mesh_lib.make_mesh(mesh_cfg, devices=devices)
    cfg = config(settings)
    tc = cfg.train
    step_cfg = StepConfig(beta=float(tc.beta), caption_dropout=float(tc.caption_dropout),
                          scaling_factor=0.5)
    lr = float(tc.learning_rate)
    optimizer = optax.chain(optax.clip_by_global_norm(float(tc.grad_clip)), optax.adamw(lr))
    return Trainer(_tiny.unet(), _tiny.SCHED, step_cfg, optimizer, mesh, seed=cfg.seed,
                   lr_fn=learning_rate_schedule(lr, 0), consts=_tiny.CONSTS, min_size=64,
                   lora=lora.from_config(tc.lora))


def run(workdir, settings: dict, trainer=None) -> dict:
    """`train.fit` of the tiny UNet under `settings` in WORKDIR/train; `trainer` None: made
    over every process's devices. Writes WORKDIR/layout_<process>.json (how the parameters
    lie)."""
    import jax

    from fifa_jax.parallel import hosts
    from fifa_jax.training import train

    trainer = trainer or make_trainer(settings)
    cfg = config(settings)
    sig = settings.get("signal_at") or {}
    loader = SyntheticPairs(jax.process_index(), jax.process_count(),
                            hang_at=settings.get("hang_at"),
                            signal_at=(sig.get("position")
                                       if sig.get("process") == jax.process_index() else None),
                            marker_dir=workdir)
    out = pathlib.Path(workdir) / train.STAGE
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    hosts.barrier("worker:mkdir")
    leaves = jax.tree.leaves(trainer.state.params)
    # the parameter elements this process holds (its devices' distinct slices) of the total
    held = sum(sum({str(sh.index): sh.data.size for sh in x.addressable_shards}.values())
               for x in leaves)
    layout = {"params": len(leaves), "mesh": dict(trainer.mesh.shape),
              "split": sum(x.addressable_shards[0].data.shape != x.shape for x in leaves),
              "held": held / sum(x.size for x in leaves)}
    pathlib.Path(workdir, f"layout_{jax.process_index()}.json").write_text(json.dumps(layout))
    compat = train.trajectory_hash(cfg, workdir)
    return train.fit(cfg, trainer, loader, None, out, compat)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} WORKDIR SETTINGS_JSON", file=sys.stderr)
        return 2
    import jax
    from absl import logging

    from fifa_jax.training import train
    logging.set_verbosity(logging.INFO)       # "resumed from step N" is an info line
    workdir, settings = argv[1], json.loads(argv[2])
    try:
        result, rc = run(workdir, settings), 0
    except train.Interrupted as e:
        result, rc = {"interrupted": str(e), "step": e.step}, 128 + e.signum
    path = pathlib.Path(workdir, f"result_{jax.process_index()}.json")
    path.write_text(json.dumps(result, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
