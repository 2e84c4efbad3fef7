"""The DPO train step: shared noise/timestep, accumulation = one large batch, sharded = single
device, the reference never changes, non-finite steps are refused, and it really learns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fifa_jax.training import train_step as tstep
from tests.training import _tiny


def test_winner_and_loser_share_noise_and_timestep():
    flat = _tiny.pairs(4)
    keys = tstep.pair_keys(jnp.zeros((2,), jnp.uint32), 0, 4)
    cfg = tstep.StepConfig(beta=1.0, caption_dropout=0.0, scaling_factor=0.5)
    xt, t, ctx, tgt = tstep.micro_batch_inputs(keys, flat, _tiny.CONSTS, _tiny.SCHED, cfg,
                                               train=True)
    w, lo = slice(0, None, 2), slice(1, None, 2)       # rows 2j, 2j + 1: pair j (interleaved)
    np.testing.assert_array_equal(np.asarray(t[w]), np.asarray(t[lo]))
    np.testing.assert_array_equal(np.asarray(tgt[w]), np.asarray(tgt[lo]))  # epsilon target
    assert len(set(np.asarray(t[w]).tolist())) > 1           # pairs draw their own t
    abar = _tiny.SCHED.alphas_cumprod[np.asarray(t[w]).astype(int)][:, None, None, None]
    # the implied noise of each image is the shared target (std of the posterior ~ 0.05)
    for half, m in ((w, flat["moments_w"]), (lo, flat["moments_l"])):
        x0 = np.asarray(xt[half]) - np.sqrt(1 - abar) * np.asarray(tgt[half])
        np.testing.assert_allclose(x0 / np.sqrt(abar), m[:, :4] * 0.5, atol=0.05 * 0.5 * 5)
    for half in (w, lo):
        np.testing.assert_array_equal(np.asarray(ctx["encoder_hidden_states"][half]),
                                      flat["prompt_embeds"])


def test_draws_do_not_depend_on_the_micro_batch_split():
    keys = tstep.pair_keys(jnp.array([1, 2], jnp.uint32), 7, 8)
    k2 = tstep.pair_keys(jnp.array([1, 2], jnp.uint32), 7, 8).reshape(4, 2)
    np.testing.assert_array_equal(jax.random.key_data(keys).reshape(4, 2, -1),
                                  jax.random.key_data(k2))


def _params(tr):
    return jax.tree.map(np.asarray, jax.device_get(tr.state.params))


def test_accumulation_equals_one_large_batch(forms):
    flat = _tiny.pairs(8, seed=1)
    sgd = optax.sgd(1.0)
    one = _tiny.trainer(optimizer=sgd, kernels=True)
    m1 = one.step(_tiny.as_steps(flat, 1))
    four = _tiny.trainer(optimizer=sgd, kernels=True)
    m4 = four.step(_tiny.as_steps(flat, 4))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    assert float(m1["grad_norm"]) > 0
    # sgd(1): the parameter differences are the gradient differences (float32 sums in
    # another order: ulps of gradients up to ~1)
    for a, b in zip(jax.tree.leaves(_params(four)), jax.tree.leaves(_params(one))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow        # three 8-device trainers (about a minute); .ci/run's second pass
def test_host_accumulation_and_zero_equal_the_scan():
    """train.accumulate="host" (A compiled micro-steps into a donated gradient buffer, then the
    update) gives the scan's step: same pair keys, losses, gradients and Adam updates, with
    FSDP over 4 of 8 devices; so does mesh.param_tactic="zero" (parameters whole, optimiser
    state and accumulator split). FLOPs per update are the scan's (the update aside)."""
    from jax.sharding import PartitionSpec as P
    flat = _tiny.pairs(24, seed=5)
    scan = _tiny.trainer((2, 4), accumulate="scan")
    host = _tiny.trainer((2, 4), accumulate="host")
    zero = _tiny.trainer((2, 4), accumulate="host", tactic="zero")
    specs = lambda t: [s.spec for s in jax.tree.leaves(t)]       # noqa: E731
    assert all(s == P() for s in specs(zero.state_shardings.params))
    assert all(s == P() for s in specs(zero.param_shardings))
    assert any("fsdp" in str(s) for s in specs(zero.state_shardings.opt_state))
    assert specs(zero.grad_shardings) == specs(scan.state_shardings.params)
    for i in range(2):
        batch = _tiny.as_steps({k: np.roll(v, 5 * i, axis=0) for k, v in flat.items()}, 3)
        ms = scan.step(batch)
        for tr in (host, zero):
            m = tr.step(batch)
            assert set(m) == set(ms)
            for k in ms:
                np.testing.assert_allclose(float(m[k]), float(ms[k]), rtol=1e-5, atol=1e-7,
                                           err_msg=k)
    assert float(ms["grad_norm"]) > 0 and int(zero.state.step) == 2
    for tr in (host, zero):
        for a, b in zip(jax.tree.leaves(_params(tr)), jax.tree.leaves(_params(scan))):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # the scan's figure counts the optimiser update once a micro-batch (A times), the host
    # loop's not at all: on this tiny UNet that is about 1% of the step
    assert host.step_flops == pytest.approx(scan.step_flops, rel=0.03)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_sharded_equals_single_device(mesh_shape, forms):
    flat = _tiny.pairs(16, seed=2)
    single = _tiny.trainer((1, 1), kernels=True)
    sharded = _tiny.trainer(mesh_shape, kernels=True)
    if mesh_shape[1] > 1:       # FSDP: some parameter is really split over "fsdp"
        specs = [s.spec for s in jax.tree.leaves(sharded.param_shardings)]
        assert any("fsdp" in str(s) for s in specs)
    for i in range(3):
        batch = _tiny.as_steps({k: np.roll(v, i, axis=0) for k, v in flat.items()}, 2)
        ms, mm = single.step(batch), sharded.step(batch)
        np.testing.assert_allclose(float(mm["loss"]), float(ms["loss"]), rtol=1e-5)
    # Adam divides each gradient by its own scale, so float32 reduction order (ulps of the
    # gradients) moves a parameter whose gradient is near 0 by a small fraction of lr (1e-3)
    # per step: a 10% bound (seen: 5.5e-5 with the CPU kernels, which sum in another order
    # than XLA), and almost all parameters agree to 1e-6
    diffs = []
    for a, b in zip(jax.tree.leaves(_params(sharded)), jax.tree.leaves(_params(single))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
        diffs.append(np.abs(a - b).ravel())
    assert np.quantile(np.concatenate(diffs), 0.99) < 1e-6
    assert int(sharded.state.step) == 3


def test_learns_and_keeps_the_reference():
    """Training on separable pairs (winners' latents near +1, losers' near -1) raises the
    held-out implicit accuracy well above 0.5 and lowers the loss; the reference stays
    bit-identical and never shares the policy's buffers."""
    train, held_out = _tiny.pairs(16, seed=3, separable=True), _tiny.pairs(16, seed=4,
                                                                            separable=True)
    tr = _tiny.trainer(lr=3e-3, beta=200.0, dropout=0.0)
    ref_before = jax.tree.map(np.array, jax.device_get(tr.ref_params))
    ref_ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tr.ref_params)}
    evals = [_tiny.as_steps(held_out, 1)]
    before = tr.evaluate(evals, key_seed=9)
    assert before["implicit_acc"] == 0.5        # policy == reference: every pair ties
    losses = []
    for i in range(60):
        m = tr.step(_tiny.as_steps({k: np.roll(v, i, 0) for k, v in train.items()}, 2))
        assert float(m["finite"]) == 1.0
        losses.append(float(m["loss"]))
    after = tr.evaluate(evals, key_seed=9)
    assert after["implicit_acc"] >= 0.8, after
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    ref_after = jax.tree.map(np.asarray, jax.device_get(tr.ref_params))
    for a, b in zip(jax.tree.leaves(ref_after), jax.tree.leaves(ref_before)):
        np.testing.assert_array_equal(a, b)
    assert not ref_ptrs & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tr.state.params)}


def test_non_finite_step_leaves_the_state_unchanged():
    tr = _tiny.trainer(beta=float("inf"))
    before = _params(tr)
    m = tr.step(_tiny.as_steps(_tiny.pairs(4), 1))
    assert float(m["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves(_params(tr)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_sdxl_added_conditioning_reaches_the_unet():
    """With pooled embeddings the step feeds text_embeds and the time ids (and drops the
    pooled embedding with the prompt); the pooled input changes the loss."""
    flat = _tiny.pairs(4, seed=6)
    flat["pooled"] = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    keys = tstep.pair_keys(jnp.zeros((2,), jnp.uint32), 0, 4)
    cfg = tstep.StepConfig(beta=1.0, caption_dropout=0.5, scaling_factor=0.5)
    _, _, ctx, _ = tstep.micro_batch_inputs(keys, flat, _tiny.CONSTS_XL, _tiny.SCHED, cfg,
                                            train=True)
    dropped = np.asarray(ctx["encoder_hidden_states"][::2]).std(axis=(1, 2)) == 0  # winners
    pooled = np.asarray(ctx["text_embeds"][::2])
    assert 0 < dropped.sum() < 4                       # some prompts dropped, not all
    np.testing.assert_array_equal(pooled[dropped], 0.0)
    np.testing.assert_array_equal(pooled[~dropped], flat["pooled"][~dropped])
    np.testing.assert_array_equal(np.asarray(ctx["time_ids"][0]), [32, 32, 0, 0, 32, 32])
    tr = _tiny.trainer_xl()
    m1 = tr.step(_tiny.as_steps(flat, 1))
    other = dict(flat, pooled=flat["pooled"] * 3.0)
    tr2 = _tiny.trainer_xl()
    m2 = tr2.step(_tiny.as_steps(other, 1))
    assert float(m1["finite"]) == 1.0
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) > 1e-6


def test_step_flops_count_every_micro_batch():
    """MFU's FLOPs: 4 micro-batches of 2 pairs cost 4 times one (XLA's cost analysis alone
    counts the accumulation loop's body once)."""
    one, four = _tiny.trainer(), _tiny.trainer()
    one.compiled_step(_tiny.as_steps(_tiny.pairs(2), 1))
    four.compiled_step(_tiny.as_steps(_tiny.pairs(8), 4))
    assert one.step_flops > 0
    np.testing.assert_allclose(four.step_flops / one.step_flops, 4.0, rtol=0.01)


def test_heldout_metrics_by_timestep_band_match_a_per_pair_count():
    """eval_step's band sums, read back by heldout_means, equal each pair's loss and accuracy
    binned by its own timestep in plain Python; the bands add up to the whole."""
    from fifa_jax.training.batches import band_means
    from fifa_jax.training.dpo import dpo_loss
    tr = _tiny.trainer(lr=3e-3, beta=200.0, dropout=0.0)
    for _ in range(3):         # move the policy off the reference so accuracies differ
        tr.step(_tiny.as_steps(_tiny.pairs(16, seed=3, separable=True), 2))
    flat = _tiny.pairs(32, seed=8)
    batch = dict(_tiny.as_steps(flat, 1), weights=np.ones((1, 32), np.float32))
    batch["weights"][0, -3:] = 0.0                               # padding is not counted
    res = tr.evaluate([batch], key_seed=4)
    # the slow reference: each pair's timestep and values from the step's own inputs
    key_data = jax.random.key_data(jax.random.key(4)).astype(jnp.uint32)
    keys = tstep.pair_keys(key_data, 0, 32)
    micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    xt, t, ctx, tgt = tstep.micro_batch_inputs(keys, micro, _tiny.CONSTS, _tiny.SCHED,
                                               tr.step_cfg, train=False)
    pol = tstep.call_unet(tr.unet_fn, tr.state.params, xt, t, ctx)
    ref = tstep.call_unet(tr.unet_fn, tr.ref_params, xt, t, ctx)
    _, aux = dpo_loss(pol, ref, tgt, tr.step_cfg.beta, interleaved=True)
    t_pair = np.asarray(t[0::2]).astype(int)
    w = batch["weights"][0]
    edges = tstep.band_edges(1000)
    assert edges[0] == (0, 249) and edges[-1] == (750, 999)
    for lo, hi in edges:
        m = (t_pair >= lo) & (t_pair <= hi) & (w > 0)
        assert res[f"pairs@t{lo}-{hi}"] == m.sum()
        if m.sum():
            np.testing.assert_allclose(res[f"implicit_acc@t{lo}-{hi}"],
                                       np.asarray(aux["pair_acc"])[m].mean(), atol=1e-6)
            np.testing.assert_allclose(res[f"loss@t{lo}-{hi}"],
                                       np.asarray(aux["pair_loss"])[m].mean(), rtol=1e-4)
    total = sum(res[f"pairs@t{lo}-{hi}"] for lo, hi in edges)
    assert total == res["pairs"] == 29
    acc = sum(res[f"pairs@t{lo}-{hi}"] * res.get(f"implicit_acc@t{lo}-{hi}", 0)
              for lo, hi in edges) / total
    np.testing.assert_allclose(acc, res["implicit_acc"], atol=1e-6)
    assert 0.0 < res["implicit_acc"] < 1.0
    # an empty band gets a count and no mean
    empty = band_means({"n": np.array([2.0, 0.0]), "loss": np.array([1.0, 0.0])}, 10)
    assert empty == {"pairs@t0-4": 2.0, "loss@t0-4": 0.5, "pairs@t5-9": 0.0}
