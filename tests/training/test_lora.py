"""LoRA Diffusion-DPO (training/lora.py): the policy is base + adapters, the reference the
base's own arrays; only the adapters train; sharded == single device; the adapters' gradient
is the chain rule of the full-parameter gradient; a restored checkpoint continues
bit-identically."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fifa_jax.training import checkpoints, lora as lora_lib
from fifa_jax.training import train_step as tstep
from tests.training import _tiny

LORA = lora_lib.LoraConfig(rank=2, alpha=3.0)


def _host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def _batch(flat, i, a=2):
    return _tiny.as_steps({k: np.roll(v, i, axis=0) for k, v in flat.items()}, a)


def test_default_targets_are_the_attention_projections():
    tr = _tiny.trainer(lora=LORA)
    names = sorted(lora_lib.unet_module_name(p) for p in lora_lib.targets(tr.ref_params, LORA))
    assert names and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in names)
    assert {n.rsplit(".", 2)[-2] if n.endswith(".0") else n.rsplit(".", 1)[-1]
            for n in names} == {"to_q", "to_k", "to_v", "to_out"}
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)
    flat = traverse_util.flatten_dict(_host(tr.state.params))
    assert {p[-1] for p in flat} == {"lora_A", "lora_B"}
    for p, v in flat.items():      # PEFT's init: A ~ U(+-1/sqrt(in)), B = 0
        if p[-1] == "lora_B":
            assert not v.any() and v.shape[1] == 2
        else:
            assert v.shape[0] == 2 and 0 < np.abs(v).max() <= 1 / np.sqrt(v.shape[1])


def test_step_zero_policy_is_the_base_and_only_adapters_train():
    tr = _tiny.trainer(lora=LORA, lr=1e-2)
    base = _host(tr.ref_params)
    ref_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tr.ref_params)}
    for a, b in zip(jax.tree.leaves(_host(tr.policy_params())), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    flat = _tiny.pairs(8, seed=1)
    m = tr.step(_batch(flat, 0))
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)   # DPO at init
    assert float(m["implicit_acc"]) == 0.5
    for i in range(1, 3):
        tr.step(_batch(flat, i))
    # the reference is still the loaded arrays (no copy made, none changed)
    assert {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tr.ref_params)} == ref_ptrs
    for a, b in zip(jax.tree.leaves(_host(tr.ref_params)), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    ad = traverse_util.flatten_dict(_host(tr.state.params))
    assert all(ad[p].any() for p in ad if p[-1] == "lora_B")
    targeted = {p[:-1] for p in ad}
    pol = traverse_util.flatten_dict(_host(tr.policy_params()))
    ref = traverse_util.flatten_dict(base)
    for p, v in pol.items():
        if p[-1] == "kernel" and p[:-1] in targeted:
            assert not np.array_equal(v, ref[p]), p
        else:
            np.testing.assert_array_equal(v, ref[p])


@pytest.mark.parametrize("mesh_shape", [(2, 4)])
def test_lora_sharded_equals_single_device(mesh_shape):
    flat = _tiny.pairs(16, seed=2)
    single = _tiny.trainer((1, 1), lora=LORA)
    sharded = _tiny.trainer(mesh_shape, lora=LORA)
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(sharded.param_shardings))
    for i in range(3):
        ms, mm = single.step(_batch(flat, i)), sharded.step(_batch(flat, i))
        np.testing.assert_allclose(float(mm["loss"]), float(ms["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_host(sharded.state.params)),
                    jax.tree.leaves(_host(single.state.params))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert int(sharded.state.step) == 3


def test_adapter_gradient_is_the_chain_rule_of_the_kernel_gradient():
    """Linear: W' = W + s A^T B^T (W (in, out), A (r, in), B (out, r)) and G = dL/dW' give
    dL/dA = s B^T G^T and dL/dB = s G^T A^T. Conv: W'[h, w, i, o] = W + s sum_r B[o, r]
    A[r, i, h, w] gives dL/dA[r, i, h, w] = s sum_o G[h, w, i, o] B[o, r] and
    dL/dB[o, r] = s sum_hwi G[h, w, i, o] A[r, i, h, w]."""
    cfg = lora_lib.LoraConfig(rank=2, alpha=3.0, targets=(lora_lib.DEFAULT_TARGETS,
                                                          r"resnets\.\d+\.conv[12]$"))
    tr = _tiny.trainer(lora=cfg, dropout=0.0)
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
                            * 0.3, tr.state.params)
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), _tiny.as_steps(_tiny.pairs(4, seed=5), 1))
    keys = tstep.pair_keys(tr.state.key, 0, 4)
    consts = {k: jnp.asarray(v) for k, v in _tiny.CONSTS.items()}
    args = (tr.ref_params, keys, micro, consts, tr.unet_fn, _tiny.SCHED, tr.step_cfg)
    with jax.default_matmul_precision("highest"):
        g_ad = jax.grad(lambda a: tstep.micro_loss(a, *args, policy_fn=tr.policy_fn)[0])(
            adapters)
        merged = lora_lib.merge(adapters, tr.ref_params, cfg.scale)
        g_w = jax.grad(lambda w: tstep.micro_loss(w, *args)[0])(merged)
    g_ad, g_w = traverse_util.flatten_dict(_host(g_ad)), traverse_util.flatten_dict(_host(g_w))
    ad = traverse_util.flatten_dict(_host(adapters))
    s = cfg.scale
    assert any(v.ndim == 4 for v in ad.values())
    for mod in {p[:-1] for p in ad}:
        a, b, g = ad[mod + ("lora_A",)], ad[mod + ("lora_B",)], g_w[mod + ("kernel",)]
        if a.ndim == 2:
            want_a, want_b = s * b.T @ g.T, s * g.T @ a.T
        else:
            want_a = s * np.einsum("hwio,or->rihw", g, b[:, :, 0, 0])
            want_b = s * np.einsum("hwio,rihw->or", g, a)[:, :, None, None]
        tol = 1e-5 * (np.abs(g).max() * max(np.abs(a).max(), np.abs(b).max()) * s + 1e-12)
        np.testing.assert_allclose(g_ad[mod + ("lora_A",)], want_a, atol=tol, rtol=1e-4)
        np.testing.assert_allclose(g_ad[mod + ("lora_B",)], want_b, atol=tol, rtol=1e-4)
    assert any(np.abs(v).max() > 0 for v in g_ad.values())


def test_restored_checkpoint_continues_bit_identically(tmp_path):
    """4 uninterrupted steps == 2 steps, an Orbax checkpoint (adapters + optimiser state),
    a new trainer that restores it (as train._resume does), 2 more steps."""
    flat = _tiny.pairs(8, seed=6)
    whole = _tiny.trainer(lora=LORA)
    for i in range(4):
        whole.step(_batch(flat, i))
    first = _tiny.trainer(lora=LORA)
    for i in range(2):
        first.step(_batch(flat, i))
    mgr = checkpoints.manager(tmp_path / "ckpt", max_to_keep=2, async_save=False)
    checkpoints.save(mgr, first.state, {"compat": "x"}, force=True)
    mgr.wait_until_finished()
    second = _tiny.trainer(lora=LORA, seed=0)
    state, meta = checkpoints.restore(mgr, 2, second.abstract_state, second.state_shardings)
    mgr.close()
    assert meta["compat"] == "x"
    second.restore(state)
    for i in range(2, 4):
        second.step(_batch(flat, i))
    for a, b in zip(jax.tree.leaves(_host(second.state)), jax.tree.leaves(_host(whole.state))):
        np.testing.assert_array_equal(a, b)


def test_lora_step_holds_less_than_a_full_step():
    """The compiled memory analysis: the LoRA step's arguments (state + reference) are well
    below the full step's (policy + reference + Adam's two moments)."""
    batch = _batch(_tiny.pairs(4, seed=7), 0, a=1)
    full, low = _tiny.trainer(), _tiny.trainer(lora=LORA)
    mem = [t.compiled_step(batch)[0].memory_analysis() for t in (full, low)]
    if mem[0] is None:
        pytest.skip("no memory analysis on this backend")
    assert mem[1].argument_size_in_bytes < 0.5 * mem[0].argument_size_in_bytes


def test_lora_learns():
    """The learning check with adapters only (rank 4 on the attention projections):
    held-out implicit accuracy well above 0.5 on separable pairs, lower held-out loss."""
    train, held_out = _tiny.pairs(16, seed=3, separable=True), _tiny.pairs(16, seed=4,
                                                                            separable=True)
    tr = _tiny.trainer(lr=2e-3, beta=200.0, dropout=0.0,
                       lora=lora_lib.LoraConfig(rank=4, alpha=4.0))
    evals = [_tiny.as_steps(held_out, 1)]
    before = tr.evaluate(evals, key_seed=9)
    assert before["implicit_acc"] == 0.5
    for i in range(60):
        m = tr.step(_batch(train, i))
        assert float(m["finite"]) == 1.0
    after = tr.evaluate(evals, key_seed=9)
    assert after["implicit_acc"] >= 0.8, after
    assert after["loss"] < before["loss"] - 0.05, (before, after)


def test_full_fine_tuning_keeps_its_trajectory_hash(tmp_path):
    """train.lora.rank = 0: checkpoints made before LoRA existed still resume (the resume
    hash is what it was without the lora keys); rank > 0 is another trajectory."""
    import ml_collections

    from fifa_jax.training import train
    config = ml_collections.ConfigDict({"seed": 0, "train": train.default_config()})
    with_keys = train.trajectory_hash(config, tmp_path)
    del config.train["lora"]
    assert train.trajectory_hash(config, tmp_path) == with_keys
    config.train.lora = train.default_config().lora
    config.train.lora.rank = 4
    assert train.trajectory_hash(config, tmp_path) != with_keys
    assert lora_lib.from_config(config.train.lora) == lora_lib.LoraConfig(
        rank=4, alpha=4.0, targets=(lora_lib.DEFAULT_TARGETS,))


def test_bad_targets_are_named():
    from fifa_jax.errors import ConfigError, InputError
    from fifa_jax.training import train
    tc = train.default_config()
    tc.lora.targets = "attn1.to_q,("
    with pytest.raises(ConfigError, match="train.lora.targets"):
        train.check_config(tc)
    params = {"attn1": {"to_q": {"kernel": np.zeros((4, 4), np.float32)}}}
    with pytest.raises(InputError, match="matches no layer"):
        lora_lib.targets(params, lora_lib.LoraConfig(rank=2, alpha=2.0, targets=("ff",)))
    assert list(lora_lib.targets(params, lora_lib.LoraConfig(rank=2, alpha=2.0))) == [
        ("attn1", "to_q")]


def test_train_loop_sigterm_and_resume_is_bit_identical(tmp_path):
    """`train.fit` with LoRA (the loop of tests/parallel/_fsdp_train_worker.py on one
    device): SIGTERM mid-run saves and raises Interrupted; the same call resumes from that
    checkpoint (adapters + optimiser state + loader position) and ends bit-identical to an
    uninterrupted run."""
    from fifa_jax.training import train
    from tests.parallel import _fsdp_train_worker as worker
    settings = {"seed": 0, "num_steps": 6, "checkpoint_every": 3, "log_every": 1,
                "lora_rank": 2}

    def fit(workdir, **over):
        s = dict(settings, **over)
        trainer = worker.make_trainer(s, devices=jax.devices()[:1])
        return worker.run(workdir, s, trainer=trainer), trainer

    _, whole = fit(tmp_path / "whole")
    with pytest.raises(train.Interrupted) as stop:
        fit(tmp_path / "cut", signal_at={"position": 2, "process": 0})
    assert stop.value.step == 3          # the loader is asked for position 2 in step 3
    summary, resumed = fit(tmp_path / "cut")
    assert summary["start_step"] == 3 and summary["final_step"] == 6
    assert {p[-1] for p in traverse_util.flatten_dict(_host(resumed.state.params))} == {
        "lora_A", "lora_B"}
    for a, b in zip(jax.tree.leaves(_host(resumed.state)), jax.tree.leaves(_host(whole.state))):
        np.testing.assert_array_equal(a, b)


def test_aot_train_programs_take_lora(tmp_path):
    """fifa_jax.aot's train programs (the pre-rental compile check) build the LoRA step for
    train.lora.rank > 0: adapters as the state, the base as the reference; on 4 CPU devices
    with FSDP its compiled arguments are well below the full step's."""
    from fifa_jax import parallel
    from fifa_jax.aot.programs import train_programs
    from tests import test_aot
    test_aot._tiny_layout(str(tmp_path))
    (tmp_path / "tiny_config.py").write_text(test_aot.CONFIG_FILE)
    sizes = {}
    for rank in (0, 4):
        c = test_aot._config(str(tmp_path), mesh_fsdp=4, mesh_data=1)
        c.train.lora.rank = rank
        step = train_programs(c, parallel.make_mesh(c.mesh, devices=jax.devices()[:4]))[0]
        assert step.name == "train_step" and step.settings["lora_rank"] == rank
        sizes[rank] = step.lower().compile().memory_analysis().argument_size_in_bytes
    assert sizes[4] < 0.5 * sizes[0]


def test_lora_with_a_bfloat16_reference():
    """train.ref_dtype=bfloat16 with LoRA: the one base copy is the bfloat16 reference and
    the policy is that base + the adapters (step 0: a tie, loss log 2)."""
    tr = _tiny.trainer(lora=LORA, ref_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(tr.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    m = tr.step(_batch(_tiny.pairs(4, seed=8), 0, a=1))
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)
    m = tr.step(_batch(_tiny.pairs(4, seed=8), 1, a=1))
    assert float(m["finite"]) == 1.0
