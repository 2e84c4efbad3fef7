"""The DPO trainer's compiled pieces on a mesh: state placement, the jitted step, evaluation.

    trainer = Trainer(unet, schedule, step_cfg, optimizer, mesh, seed=0)
    trainer.step(host_batch)       # host_batch: this host's rows, (A, B / hosts, ...) numpy
                                   # accumulate="host": A micro-steps, then the update
    trainer.evaluate(batches)      # held-out loss and implicit accuracy

`unet` is a loaded Flax UNet (its parameters may already be sharded by the loader); the
reference is its parameters as loaded (cast to `ref_dtype`), the policy a float32 copy in new
buffers. Parameters and optimiser state follow `param_shardings(rules)` (FSDP over the mesh's
"fsdp" axis where the rules say so, `parallel/param_sharding.py`), the layout `load_unet(mesh=,
rules=)` reads them into; `state_rules` (mesh.param_tactic "zero") split the optimiser state
and the host loop's gradient accumulator by other rules than the (then replicated)
parameters; batches are split over every device along the pair axis, and the step is traced
under the mesh (`jax.set_mesh`), where the models keep activations split by batch
(`parallel.mesh.constrain_batch`): FSDP gathers weights, never activations. The step
donates the state. Every host calls every method (SPMD).

LoRA (`lora`, lora.py): the state's params are the adapters (replicated, float32) and their
optimiser state; the reference is the loaded UNet's arrays (cast to `ref_dtype`), and the step
builds the policy as base + adapters from them (`lora.merge`): one copy of the UNet.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.parallel import mesh as mesh_lib
from fifa_jax.parallel import param_sharding
from fifa_jax.training import lora as lora_lib
from fifa_jax.training import train_state as ts
from fifa_jax.training.batches import heldout_means
from fifa_jax.training.train_step import (StepConfig, eval_step, micro_step, train_step,
                                          update_step, zero_grads, zero_sums)


def unet_apply(graphdef) -> Callable:
    """(params, x, t, ctx, added) -> prediction, merging the model inside the trace (needed
    with remat: a jit must not close over a live nnx model)."""
    def fn(params, x, t, ctx, added):
        return nnx.merge(graphdef, params)(x, t, ctx, added_cond_kwargs=added)
    return fn


def step_batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """(A, B, ...) batch arrays: the pair axis (1) split over every device."""
    return NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES, *([None] * (ndim - 2))))


def to_global(host_batch: dict, mesh: Mesh) -> dict:
    """This host's rows (A, B_local, ...) -> global (A, B, ...) arrays; on one host the local
    rows are the whole batch."""
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(step_batch_sharding(mesh, v.ndim), v)
    return out


ACCUMULATE = ("scan", "host")     # train.accumulate: where the micro-batch loop runs


class Trainer:
    def __init__(self, unet, schedule, step_cfg: StepConfig,
                 optimizer: optax.GradientTransformation, mesh: Mesh, *, seed: int,
                 lr_fn: Callable, consts: dict, rules=None, min_size: int = 0,
                 ref_dtype=jnp.float32, lora: lora_lib.LoraConfig | None = None,
                 accumulate: str = "scan", state_rules=None):
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate={accumulate!r}: use one of {ACCUMULATE}")
        self.accumulate = accumulate
        self.mesh, self.optimizer, self.schedule, self.step_cfg = mesh, optimizer, schedule, \
            step_cfg
        graphdef, state = nnx.split(unet)
        base = nnx.to_pure_dict(state)
        self.unet_fn = unet_apply(graphdef)
        # the loaders' layout (load_unet(mesh=, rules=)): no parameter moves when it is placed
        shard_fn = functools.partial(param_sharding.param_shardings, mesh=mesh, rules=rules,
                                     min_size=min_size)
        self.replicated = mesh_lib.replicated(mesh)
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                       base)
        self.lora, self.seed, self.policy_fn = lora, int(seed), None
        self.param_shardings = shard_fn(abstract_params)       # the UNet's layout
        base = jax.device_put(base, self.param_shardings)
        # optimiser state and gradient accumulator (ZeRO: split while the parameters are whole)
        state_fn = shard_fn if state_rules is None else functools.partial(
            param_sharding.param_shardings, mesh=mesh, rules=state_rules, min_size=min_size)
        self.grad_shardings = state_fn(abstract_params)
        if lora is None:
            self.abstract_state, self.state_shardings = ts.state_shardings(
                abstract_params, optimizer, shard_fn, self.replicated, state_fn)
            self.state = ts.init_state(base, optimizer, self.seed, self.state_shardings)
        else:
            make = functools.partial(lora_lib.init_adapters, abstract_params, lora,
                                     lora_lib.init_key(self.seed))
            self.abstract_state, self.state_shardings = ts.state_shardings(
                jax.eval_shape(make), optimizer,
                lambda t: jax.tree.map(lambda _: self.replicated, t), self.replicated)
            self.state = ts.init_state_from(make, optimizer, self.seed, self.state_shardings)
            self.policy_fn = functools.partial(lora_lib.merge, scale=lora.scale)
            self.grad_shardings = self.state_shardings.params
        # the reference is the loaded arrays themselves (the policy is a copy in new buffers),
        # or their bfloat16 cast: never a third full copy
        self.ref_params = base if jnp.dtype(ref_dtype) == jnp.float32 else jax.jit(
            lambda p: jax.tree.map(lambda x: x.astype(ref_dtype), p),
            out_shardings=self.param_shardings)(base)
        del base
        self.consts = jax.device_put({k: jnp.asarray(v) for k, v in consts.items()},
                                     self.replicated)
        self._step = jax.jit(
            functools.partial(train_step, unet_fn=self.unet_fn, optimizer=optimizer,
                              schedule=schedule, cfg=step_cfg, lr_fn=lr_fn,
                              policy_fn=self.policy_fn),
            donate_argnums=(0,), out_shardings=(self.state_shardings, self.replicated))
        step_fns = dict(unet_fn=self.unet_fn, schedule=schedule, cfg=step_cfg,
                        policy_fn=self.policy_fn)
        grad_sh = self.grad_shardings
        self._micro = jax.jit(functools.partial(micro_step, **step_fns),
                              donate_argnums=(1, 2), keep_unused=True,
                              out_shardings=(grad_sh, self.replicated))
        self._update = jax.jit(
            functools.partial(update_step, optimizer=optimizer, lr_fn=lr_fn),
            static_argnames=("a",), donate_argnums=(0,),
            out_shardings=(self.state_shardings, self.replicated))
        self._zeros = jax.jit(lambda p: (zero_grads(p), zero_sums()),
                              out_shardings=(grad_sh, self.replicated))
        self._compiled, self.step_flops = {}, None
        self._eval = jax.jit(functools.partial(eval_step, unet_fn=self.unet_fn,
                                               schedule=schedule, cfg=step_cfg,
                                               policy_fn=self.policy_fn),
                             out_shardings=self.replicated)

    def restore(self, state: ts.TrainState) -> None:
        self.state = state

    def policy_params(self):
        """The policy's UNet parameter tree (LoRA: base + adapters, merged)."""
        if self.policy_fn is None:
            return self.state.params
        return jax.jit(self.policy_fn, out_shardings=self.param_shardings)(
            self.state.params, self.ref_params)

    def compiled_step(self, host_batch: dict):
        """The compiled step for this batch's shapes (compiled once; `step_flops` from the cost
        analysis of one micro-batch's step, its memory analysis the device memory): a function
        (state, ref_params, batch, consts) -> (state, metrics), and the global batch."""
        batch = to_global(host_batch, self.mesh)
        sig = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        if sig not in self._compiled:
            if self.accumulate == "scan":
                self._compiled[sig] = self.lower_step(batch).compile()
            else:
                self._compiled[sig] = self._host_loop(batch)
            if self.step_flops is None:
                self.step_flops = self._step_flops(batch)
        return self._compiled[sig], batch

    @staticmethod
    def _micro_shapes(batch: dict) -> dict:
        """Micro-batch i of `batch` as (1, B, ...) shapes, the step's sharding."""
        return {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype, sharding=v.sharding)
                for k, v in batch.items()}

    def _host_loop(self, batch: dict):
        """accumulate="host": the compiled micro-step and update, and the loop over them."""
        a = int(batch["moments_w"].shape[0])
        micro_c, update_c = (low.compile() for low in self.lower_host(batch))
        slice_c = jax.jit(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, 1, axis=0))

        def run(state, ref_params, batch, consts):
            grads, sums = self._zeros(state.params)
            for i in range(a):
                micro = batch if a == 1 else {k: slice_c(v, i) for k, v in batch.items()}
                grads, sums = micro_c(state, grads, sums, ref_params, micro, consts,
                                      np.uint32(i))
            return update_c(state, grads, sums)
        return run

    def _step_flops(self, batch: dict) -> float | None:
        """FLOPs of one update: those of a one-micro-batch step times the A micro-batches.
        (XLA's cost analysis counts a loop body once, so the A-step program's own figure is
        about one micro-batch's; the optimiser update, counted A times here, is well under
        0.1% of a UNet step.) From the lowered program, before XLA's optimisations: the
        model's FLOPs, as MFU counts them (remat's recomputation included when it is on)."""
        from fifa_jax.training.metrics import step_flops
        a = int(batch["moments_w"].shape[0])
        one = self._micro_shapes(batch)
        low = self.lower_step(one) if self.accumulate == "scan" else self.lower_host(one)[0]
        flops = step_flops(low)
        return None if flops is None else flops * a

    def lower_step(self, batch: dict):
        """The step lowered for `batch` (global arrays or ShapeDtypeStructs) under the mesh,
        so the models' activation constraints apply (FSDP gathers weights, not activations)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(self.state, self.ref_params, batch, self.consts)

    def lower_host(self, batch: dict):
        """accumulate="host": (micro-step, update) lowered for `batch`'s micro-batches."""
        a = int(batch["moments_w"].shape[0])
        grads, sums = jax.eval_shape(self._zeros, self.state.params)
        grads = jax.tree.map(lambda g, sh: jax.ShapeDtypeStruct(g.shape, g.dtype, sharding=sh),
                             grads, self.grad_shardings)
        sums = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                           sharding=self.replicated), sums)
        with jax.set_mesh(self.mesh):
            return (self._micro.lower(self.state, grads, sums, self.ref_params,
                                      self._micro_shapes(batch), self.consts,
                                      jax.ShapeDtypeStruct((), jnp.uint32)),
                    self._update.lower(self.state, grads, sums, a=a))

    def step(self, host_batch: dict) -> dict:
        """One optimiser update; returns the step's metrics as device scalars."""
        compiled, batch = self.compiled_step(host_batch)
        self.state, metrics = compiled(self.state, self.ref_params, batch, self.consts)
        return metrics

    def evaluate(self, host_batches: Iterable[dict], key_seed: int) -> dict:
        """Weighted held-out means over `host_batches` ((1, B_local, ...) with `weights`)."""
        def one(hb, key_data, i):
            with jax.set_mesh(self.mesh):
                return self._eval(self.state.params, self.ref_params, to_global(hb, self.mesh),
                                  self.consts, key_data, i)
        return heldout_means(one, host_batches, key_seed,
                             self.schedule.num_train_timesteps)
