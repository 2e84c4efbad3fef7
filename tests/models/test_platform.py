"""The layer forms are chosen by the platform a program is lowered for (models/platform.py):
the CPU form holds our C++ custom calls only when lowered for the CPU; the accelerator forms
(FIFA_JAX_FORMS=accelerator or `platform.forms`) hold none on any platform; a program lowered
for a TPU from this CPU host holds no CPU custom call and takes Pallas attention."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fifa_jax.models import attention, conv, cpu_kernels, dense, platform
from fifa_jax.models.unet import UNet2DConditionModel

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C++ compiler: the CPU form has no custom call")
CPU_CALL = re.compile(r"fifa_\w+")          # our kernels' custom-call targets


def _layers(x, w, wd):
    """A convolution, a linear layer and an attention: each layer with a CPU form."""
    y = conv.conv2d(x, w, 1, 1)                                    # (B, H, W, 16)
    z = dense.dense(y.reshape(y.shape[0], -1, 16), wd)             # (B, HW, 16)
    q = z.reshape(z.shape[0], z.shape[1], 2, 8)
    return attention.dot_product_attention(q, q, q).sum()


ARGS = (jnp.ones((2, 4, 4, 8)), jnp.ones((3, 3, 8, 16)) * 0.1, jnp.ones((16, 16)) * 0.1)


def test_forms_decide_the_lowered_calls_and_are_part_of_the_jit_key():
    f = jax.jit(jax.grad(_layers, argnums=(0, 1, 2)))
    auto = f.lower(*ARGS).as_text()
    with platform.forms("accelerator"):
        acc = f.lower(*ARGS).as_text()
        acc_value = f(*ARGS)
    auto_value = f(*ARGS)             # the same jit object: retraced per form, not reused
    assert {"fifa_conv_forward", "fifa_conv_kernel_grad"} <= set(CPU_CALL.findall(auto))
    assert not CPU_CALL.search(acc), CPU_CALL.search(acc).group(0)
    for a, b in zip(acc_value, auto_value):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_forms_name_and_validation():
    assert platform.forms_name() in platform.FORMS
    with platform.forms("accelerator"):
        assert platform.accelerator_forms()
    with pytest.raises(ValueError, match="forms must be one of"):
        with platform.forms("gpu"):
            pass


def test_environment_variable_selects_the_accelerator_forms():
    code = ("import jax, jax.numpy as jnp\n"
            "from fifa_jax.models import conv, platform\n"
            "x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 16))\n"
            "print(platform.forms_name(), 'fifa_conv' in jax.jit(lambda x, w: "
            "conv.conv2d(x, w, 1, 1)).lower(x, w).as_text())\n")
    env = dict(os.environ, FIFA_JAX_FORMS="accelerator", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[-2:] == ["accelerator", "False"]
    env["FIFA_JAX_FORMS"] = "nonsense"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "fifa_jax_forms" in bad.stderr


def test_device_platform_reads_the_mesh():
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "fsdp"))
    assert platform.device_platform(mesh) == "cpu" == platform.device_platform()


SMALL = dict(block_out_channels=[16, 32], layers_per_block=1, cross_attention_dim=16,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2,
             norm_num_groups=4, sample_size=8)


@pytest.fixture(scope="module")
def tpu_mesh():
    from fifa_jax.aot.topology import TopologyError, tpu_devices
    try:
        devices = tpu_devices("v5e:2x2")
    except (TopologyError, ImportError) as e:
        pytest.skip(f"no compile-only TPU devices here: {e}")
    return Mesh(np.asarray(devices).reshape(4, 1), ("data", "fsdp"))


@pytest.mark.tpu
def test_train_step_lowered_for_tpu_holds_no_cpu_call_and_takes_pallas(tpu_mesh):
    """The DPO train step (2 micro-batches, FSDP rules, AdamW) lowered from this CPU host for
    a v5e 2x2 slice (auto forms, the CPU kernels compiled here): no CPU custom call; the
    attention is the Pallas (Mosaic) kernel; it compiles."""
    import functools

    import optax

    from fifa_jax.parallel import param_sharding
    from fifa_jax.training import noise_schedule as ns, train_state as ts
    from fifa_jax.training.train_step import StepConfig, train_step
    from fifa_jax.training.trainer import unet_apply
    model = nnx.eval_shape(lambda: UNet2DConditionModel(SMALL, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                          nnx.to_pure_dict(state))
    repl = NamedSharding(tpu_mesh, P())
    optimizer = optax.adamw(1e-5)
    shard = functools.partial(param_sharding.param_shardings, mesh=tpu_mesh, min_size=64)
    abstract, shardings = ts.state_shardings(params, optimizer, shard, repl)
    place = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    state_in, ref = place(abstract, shardings), place(params, shardings.params)
    pairs = NamedSharding(tpu_mesh, P(None, ("data", "fsdp")))
    a, b = 2, 4
    batch = {"moments_w": jax.ShapeDtypeStruct((a, b, 8, 8, 8), jnp.float32, sharding=pairs),
             "moments_l": jax.ShapeDtypeStruct((a, b, 8, 8, 8), jnp.float32, sharding=pairs),
             "prompt_embeds": jax.ShapeDtypeStruct((a, b, 77, 16), jnp.float32,
                                                   sharding=pairs),
             "weights": jax.ShapeDtypeStruct((a, b), jnp.float32, sharding=pairs)}
    consts = {"empty_embeds": jax.ShapeDtypeStruct((77, 16), jnp.float32, sharding=repl)}
    schedule = ns.from_scheduler_config({"beta_schedule": "scaled_linear"})
    step = jax.jit(functools.partial(
        train_step, unet_fn=unet_apply(graphdef), optimizer=optimizer, schedule=schedule,
        cfg=StepConfig(beta=5000.0, caption_dropout=0.2, scaling_factor=0.18215),
        lr_fn=lambda s: 1e-5), donate_argnums=(0,))
    with jax.set_mesh(tpu_mesh):
        lowered = step.lower(state_in, ref, batch, consts)
    text = lowered.as_text()
    assert not CPU_CALL.search(text)
    assert "tpu_custom_call" in text
    assert "tpu_custom_call" in lowered.compile().as_text()


def test_sampler_dtype_auto_is_bfloat16_on_accelerators():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    assert platform.compute_dtype_name("auto", mesh) == "float32"
    assert platform.compute_dtype_name("float32", mesh) == "float32"
    tpu = type("M", (), {"devices": np.array([type("D", (), {"platform": "tpu"})()])})()
    assert platform.compute_dtype_name("auto", tpu) == "bfloat16"
    assert platform.compute_dtype_name("float32", tpu) == "float32"
