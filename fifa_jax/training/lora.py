"""LoRA on the UNet's parameter tree: adapters A, B on the targeted linear layers.

The UNet module is untouched; LoRA is a function of parameter trees. For a targeted linear
layer with kernel W (Din, Dout) (our layout: y = x @ W + b; PyTorch's weight is W^T (Dout, Din))
the adapters are PEFT's

    lora_A (r, Din)      kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(Din), 1/sqrt(Din)), PEFT's
                         default (`init_lora_weights=True`)
    lora_B (Dout, r)     zeros: the policy equals the base at step 0

and the policy's kernel is W + s * (B @ A)^T = W + s * A^T @ B^T, s = alpha / r (PEFT's
`scaling`). A targeted convolution, kernel (kh, kw, Cin, Cout), takes PEFT's conv adapters
lora_A (r, Cin, kh, kw) (U(+-1/sqrt(Cin kh kw))) and lora_B (Cout, r, 1, 1): a conv with A
then a 1x1 conv with B, i.e. the kernel delta s * sum_r B[o, r] A[r, i, h, w]. The adapters tree mirrors the parameter tree down to each targeted module, whose
entry is {"lora_A": (r, Din), "lora_B": (Dout, r)} (float32). The reference is the base tree
itself; `merge` builds the policy's tree inside the jitted step, so gradients reach only the
adapters.

Targets are regexes searched in the diffusers module name (`unet_module_name`), e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`; linear layers and
convolutions (2-D and 4-D kernels) take adapters.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fifa_jax.errors import InputError

# the attention projections: q, k, v and the output projection of self- and cross-attention
DEFAULT_TARGETS = r"attn[12]\.to_(q|k|v|out\.0)$"
# examples of other layers: the feed-forward (`ff\.net\.(0\.proj|2)$`), the transformers'
# `proj_in$` / `proj_out$`, the resnets' convolutions (`resnets\.\d+\.conv[12]$`)
A_KEY, B_KEY = "lora_A", "lora_B"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = (DEFAULT_TARGETS,)

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)


def from_config(lc) -> LoraConfig | None:
    """`train.lora` (rank, alpha, targets: comma list of regexes) -> LoraConfig, None when
    rank is 0 (full fine-tuning)."""
    if lc is None or int(lc.rank) == 0:
        return None
    targets = tuple(t.strip() for t in str(lc.targets).split(",") if t.strip())
    return LoraConfig(rank=int(lc.rank), alpha=float(lc.alpha), targets=targets)


def init_key(seed: int) -> jax.Array:
    """The key of lora_A's initial draw: its own stream of the run's seed (the step's draws
    use fold_in(key(seed), step))."""
    return jax.random.fold_in(jax.random.key(seed), 0x4C6F5241)


def unet_module_name(path: tuple) -> str:
    """nnx module path ('up_blocks', 0, ..., 'attn1', 'to_out') -> diffusers' module name
    ('up_blocks.0....attn1.to_out.0'), the UNet's renames (unet_io.UNET_RENAMES)."""
    from fifa_jax.models.unet_io import UNET_RENAMES
    name = ".".join(str(p) for p in path) + "."
    for pattern, repl in UNET_RENAMES:
        name = re.sub(pattern, repl, name)
    return name[:-1]


def targets(params, cfg: LoraConfig) -> dict[tuple, tuple[int, ...]]:
    """nnx module path -> kernel shape ((Din, Dout) or (kh, kw, Cin, Cout)) of every linear
    layer or convolution whose diffusers name matches one of cfg.targets. Raises when none
    does (a typo in the patterns)."""
    pats = [re.compile(p) for p in cfg.targets]
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
            continue
        name = unet_module_name(path[:-1])
        if any(p.search(name) for p in pats):
            out[path[:-1]] = tuple(int(d) for d in leaf.shape)
    if not out:
        raise InputError(f"config key 'train.lora.targets' = {','.join(cfg.targets)!r} "
                         f"matches no layer of the UNet (diffusers module names, e.g. "
                         f"'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')")
    return out


def init_adapters(params, cfg: LoraConfig, key: jax.Array) -> dict:
    """The adapters of `params` (concrete or abstract): lora_A uniform(+-1/sqrt(fan_in)), one
    fold_in(key, i) per target in sorted path order; lora_B zeros."""
    flat = {}
    for i, (path, shape) in enumerate(sorted(targets(params, cfg).items(),
                                             key=lambda kv: str(kv[0]))):
        a_shape, b_shape = adapter_shapes(shape, cfg.rank)
        bound = 1.0 / jnp.sqrt(jnp.float32(np.prod(a_shape[1:])))
        flat[path + (A_KEY,)] = jax.random.uniform(jax.random.fold_in(key, i), a_shape,
                                                   jnp.float32, -bound, bound)
        flat[path + (B_KEY,)] = jnp.zeros(b_shape, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def adapter_shapes(kernel_shape: tuple, rank: int) -> tuple[tuple, tuple]:
    """PEFT's (lora_A, lora_B) shapes for our kernel: linear (Din, Dout) -> (r, Din),
    (Dout, r); conv (kh, kw, Cin, Cout) -> (r, Cin, kh, kw), (Cout, r, 1, 1)."""
    if len(kernel_shape) == 2:
        din, dout = kernel_shape
        return (rank, din), (dout, rank)
    kh, kw, cin, cout = kernel_shape
    return (rank, cin, kh, kw), (cout, rank, 1, 1)


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """Our kernel's delta, float32: linear (Din, Dout) = s * A^T @ B^T from A (r, Din),
    B (Dout, r); conv (kh, kw, Cin, Cout) = s * sum_r B[o, r] A[r, i, h, w]."""
    hi = jax.lax.Precision.HIGHEST
    if a.ndim == 2:
        return scale * jnp.dot(a.T, b.T, precision=hi)
    return scale * jnp.einsum("or,rihw->hwio", b[:, :, 0, 0], a, precision=hi)


def merge(adapters, base, scale: float):
    """The policy's parameter tree: `base` with kernel (float32) + delta on every adapted
    module; every other leaf is `base`'s own array."""
    ad = traverse_util.flatten_dict(adapters)
    modules = {p[:-1] for p in ad}

    def one(keypath, w):             # the tree's own structure is kept (empty nodes too)
        path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
        mod = path[:-1]
        if path[-1] == "kernel" and mod in modules:
            return w.astype(jnp.float32) + delta(ad[mod + (A_KEY,)], ad[mod + (B_KEY,)], scale)
        return w
    return jax.tree_util.tree_map_with_path(one, base)


def torch_tensors(adapters, scale: float, prefix: str = "unet") -> dict:
    """diffusers / PEFT LoRA keys -> numpy arrays, `<prefix>.<module>.lora_A.weight` (r, Din)
    and `.lora_B.weight` (Dout, r) with the scale alpha / r folded into lora_B, so that
    loaders that assume alpha = r (diffusers without alphas or metadata) give
    W + B' @ A = W + s * B @ A exactly."""
    out = {}
    for path, v in traverse_util.flatten_dict(jax.device_get(adapters)).items():
        name = f"{prefix}.{unet_module_name(path[:-1])}.{path[-1]}.weight"
        v = np.asarray(v, np.float32)
        out[name] = v * np.float32(scale) if path[-1] == B_KEY else v
    return out


def from_torch_tensors(tensors, params, source: str, prefix: str = "unet") -> dict:
    """The adapters (scale 1) of a diffusers / PEFT LoRA file's `tensors` for the UNet whose
    parameter tree is `params` (strict: a key that names no linear or conv layer, a module
    missing its A or B, or a shape that does not fit is an error naming the key and
    `source`)."""
    names = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and len(leaf.shape) in (2, 4):
            names[unet_module_name(path[:-1])] = (path[:-1], tuple(int(d) for d in leaf.shape))
    flat = {}
    pat = re.compile(rf"^{re.escape(prefix)}\.(.+)\.(lora_A|lora_B)\.weight$")
    for key in sorted(tensors):
        m = pat.match(key)
        if not m or m.group(1) not in names:
            raise InputError(f"{source}: key {key!r} is not `{prefix}.<linear layer or conv of "
                             f"this UNet>.lora_A|lora_B.weight`")
        path, shape = names[m.group(1)]
        v = np.asarray(tensors[key], np.float32)
        is_a = m.group(2) == A_KEY
        rank = (v.shape[0] if is_a else v.shape[1]) if v.ndim >= 2 else -1
        want = adapter_shapes(shape, rank)[0 if is_a else 1]
        if v.shape != want:
            raise InputError(f"{source}: {key} has shape {v.shape}; this layer takes {want} "
                             f"(rank {rank})")
        flat[path + (m.group(2),)] = v
    for path in {p[:-1] for p in flat}:
        a, b = flat.get(path + (A_KEY,)), flat.get(path + (B_KEY,))
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise InputError(f"{source}: {unet_module_name(path)} needs lora_A (r, in) and "
                             f"lora_B (out, r) of the same rank")
    return traverse_util.unflatten_dict(flat)


WEIGHTS_NAME = "pytorch_lora_weights.safetensors"     # diffusers' LORA_WEIGHT_NAME_SAFE


def merge_file_into(unet, path: str) -> None:
    """Add a diffusers / PEFT LoRA file (`path`: the file, or a folder holding
    pytorch_lora_weights.safetensors) to the nnx UNet `unet`'s kernels in place: W += B @ A
    (the scale folded into B, as `torch_tensors` writes it)."""
    import os

    from flax import nnx
    from safetensors.numpy import load_file
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(path):
        raise InputError(f"{path}: no LoRA weights file (export/lora/{WEIGHTS_NAME})")
    state = nnx.state(unet, nnx.Param)
    params = nnx.to_pure_dict(state)
    adapters = from_torch_tensors(load_file(path), params, path)
    merged = merge(adapters, params, 1.0)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda new, old: jnp.asarray(new, old.dtype), merged, params))
    nnx.update(unet, state)
