"""The train state: step, float32 policy parameters, float32 optimiser state, the RNG key.

The frozen reference parameters are not part of it: they are the base model's weights, a
separate set of arrays (never the policy's buffers; optionally bfloat16, `train.ref_dtype`)
passed beside the state to the step, and reloaded from the base model on resume rather than
checkpointed.

Building: `init_state` places everything by `shardings` (parameters already on their
devices), so no full copy of the model ever sits on one device.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array            # () int32: optimiser updates applied
    params: Any                # pytree of float32 policy parameters (nnx pure dict)
    opt_state: Any             # optax state, float32
    key: jax.Array             # (2,) uint32 raw key: every draw is fold_in(key, step, pair)


def state_shardings(abstract_params, optimizer, param_shardings_fn, replicated,
                    opt_shardings_fn=None):
    """(abstract TrainState, its shardings): parameters by `param_shardings_fn(tree)`,
    optimiser leaves by `opt_shardings_fn` (None: the parameters'; ZeRO: split while the
    parameters are whole), step and key replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, key=jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = TrainState(step=replicated, params=param_shardings_fn(abstract_params),
                           opt_state=(opt_shardings_fn or param_shardings_fn)(abstract_opt),
                           key=replicated)
    return abstract, shardings


def init_state(base_params, optimizer, seed: int, shardings: TrainState) -> TrainState:
    """A fresh state whose policy is a float32 copy of `base_params` (new buffers: the
    caller's arrays, e.g. the reference, are never aliased)."""
    def make(params):
        policy = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=policy,
                          opt_state=optimizer.init(policy),
                          key=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))
    return jax.jit(make, out_shardings=shardings)(base_params)


def init_state_from(make_params, optimizer, seed: int, shardings: TrainState) -> TrainState:
    """A fresh state whose params are `make_params()` (e.g. LoRA adapters, lora.py)."""
    def make():
        params = make_params()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params),
                          key=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))
    return jax.jit(make, out_shardings=shardings)()
