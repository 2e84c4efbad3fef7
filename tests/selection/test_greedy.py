"""Greedy set maximisation == brute-force greedy (numpy float64) on random small problems."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from fifa_jax.selection.greedy import exact_gains, greedy_select, set_objective


def objective(a, pid, emb, members, k, gamma, eps):
    """F(S) straight from method.md: sum a + gamma [|S| > k] sum log max(rho_k^S, eps)."""
    members = list(members)
    f = float(np.sum(a[members]))
    if len(members) > k:
        e = emb[pid[members]].astype(np.float64)
        d = np.sqrt(((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
        d = np.maximum(d, eps)
        np.fill_diagonal(d, np.inf)
        f += gamma * float(np.sum(np.log(np.sort(d, axis=1)[:, k - 1])))
    return f


def brute_force_greedy(a, pid, emb, K, k, gamma, eps, cap=0):
    chosen = []
    for _ in range(K):
        base = objective(a, pid, emb, chosen, k, gamma, eps)
        gains = np.full(a.size, -np.inf)
        for j in range(a.size):
            full = cap > 0 and sum(pid[c] == pid[j] for c in chosen) >= cap
            if j not in chosen and not full:
                gains[j] = objective(a, pid, emb, chosen + [j], k, gamma, eps) - base
        chosen.append(int(np.argmax(gains)))
    return np.array(chosen)


def make_problem(seed):
    rng = np.random.default_rng(seed)
    u = int(rng.integers(6, 16))
    n = int(rng.integers(u, 45))
    d = int(rng.choice([2, 3, 8]))
    emb = rng.normal(size=(u, d)).astype(np.float32)
    if seed % 3 == 0:                     # two different prompts with identical embeddings
        emb[1] = emb[0]
    pid = np.concatenate([np.arange(u), rng.integers(0, u, n - u)])
    rng.shuffle(pid)
    a = rng.normal(size=n).astype(np.float32)
    if seed % 4 == 1:                     # exact ties in a: smallest index must win
        a = np.round(a).astype(np.float32)
    k = int(rng.integers(1, 5))
    K = int(rng.integers(k + 2, min(n, 3 * k + 8) + 1))
    gamma = float(rng.choice([0.5, 1.0, 2.0]))
    eps = float(rng.choice([1e-3, 1e-2]))
    cap = int(rng.choice([0, 0, 2])) if K <= 2 * u else 0
    return a, pid, emb, K, k, gamma, eps, cap


@pytest.mark.parametrize("seed", range(24))
def test_greedy_matches_brute_force(seed):
    a, pid, emb, K, k, gamma, eps, cap = make_problem(seed)
    want = brute_force_greedy(a.astype(np.float64), pid, emb, K, k, gamma, eps, cap)
    got = greedy_select(a, pid, emb, K, knn_k=k, gamma=gamma, eps=eps, cap_per_prompt=cap,
                        chunk=4, steps_per_call=7, progress=False)
    np.testing.assert_array_equal(got.order, want)
    # the recorded (device, float32) and recomputed (host, float64) gains are the brute-force
    # gains of each pick
    exact = exact_gains(a, pid, emb, got.order, knn_k=k, gamma=gamma, eps=eps)
    a64 = a.astype(np.float64)
    for t in range(K):
        g = (objective(a64, pid, emb, want[:t + 1], k, gamma, eps)
             - objective(a64, pid, emb, want[:t], k, gamma, eps))
        assert abs(got.gains[t] - g) < 1e-3 * max(1.0, abs(g))
        assert abs(exact[t] - g) < 1e-6 * max(1.0, abs(g))


def tie_problem(seed, dup_emb):
    """Like make_problem but with k up to 5 and caps up to 3: exact float64 ties between
    candidates of different prompts occur (seeds 23, 31, 37), which float32 penalties split."""
    rng = np.random.default_rng(seed)
    u = int(rng.integers(6, 14))
    n = int(rng.integers(u, 40))
    d = int(rng.choice([2, 5, 16]))
    emb = rng.normal(size=(u, d)).astype(np.float32)
    if dup_emb:
        emb[1], emb[3] = emb[0], emb[2]
    pid = np.concatenate([np.arange(u), rng.integers(0, u, n - u)])
    rng.shuffle(pid)
    a = rng.normal(size=n).astype(np.float32) * float(rng.choice([0.1, 1, 3]))
    if seed % 2:
        a = np.round(a)
    k = int(rng.integers(1, 6))
    K = int(rng.integers(k + 1, min(n, 3 * k + 10) + 1))
    cap = int(rng.choice([0, 1, 2, 3]))
    if cap and K > sum(min(c, cap) for c in np.bincount(pid)):
        cap = 0
    return a.astype(np.float32), pid, emb, K, k, float(rng.choice([0.3, 1, 2])), cap


@pytest.mark.parametrize("seed,dup_emb", [(23, False), (37, False), (31, True)])
def test_exact_ties_go_to_the_smallest_index(seed, dup_emb):
    a, pid, emb, K, k, gamma, cap = tie_problem(seed, dup_emb)
    want = brute_force_greedy(a.astype(np.float64), pid, emb, K, k, gamma, 1e-2, cap)
    got = greedy_select(a, pid, emb, K, knn_k=k, gamma=gamma, eps=1e-2, cap_per_prompt=cap,
                        chunk=4, steps_per_call=5, progress=False)
    np.testing.assert_array_equal(got.order, want)


def test_identical_embeddings_of_two_prompts_are_floored_at_eps():
    """d = 768 unit vectors, eps = 1e-4: the matmul form leaves ~3e-4 between identical rows,
    which must still count as distance 0 (floored at eps), as in the float64 brute force."""
    rng = np.random.default_rng(0)
    u, k, eps = 12, 1, 1e-4
    emb = rng.normal(size=(u, 768))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[1] = emb[0]
    emb = emb.astype(np.float32)
    pid = np.arange(u)
    a = np.zeros(u, np.float32)
    a[0], a[2] = 30, 25
    # make candidate 1 lose step 3 by 0.5 nat under the exact (floored) objective
    a64 = a.astype(np.float64)
    base = objective(a64, pid, emb, [0, 2], k, 1.0, eps)
    gains = [objective(a64, pid, emb, [0, 2, j], k, 1.0, eps) - base for j in range(u)]
    a[1] = np.float32(max(gains[3:]) - gains[1] - 0.5)
    want = brute_force_greedy(a.astype(np.float64), pid, emb, 3, k, 1.0, eps)
    got = greedy_select(a, pid, emb, 3, knn_k=k, gamma=1.0, eps=eps, progress=False)
    np.testing.assert_array_equal(got.order, want)
    assert 1 not in got.order.tolist()


def test_sharded_equals_single_device():
    rng = np.random.default_rng(5)
    u, n = 37, 203
    emb = rng.normal(size=(u, 6)).astype(np.float32)
    pid = rng.integers(0, u, n)
    a = rng.normal(size=n).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    one = greedy_select(a, pid, emb, 40, knn_k=3, gamma=1.0, eps=1e-3, chunk=4, progress=False)
    many = greedy_select(a, pid, emb, 40, knn_k=3, gamma=1.0, eps=1e-3, chunk=4, mesh=mesh,
                         progress=False)
    np.testing.assert_array_equal(one.order, many.order)
    np.testing.assert_allclose(one.gains, many.gains, rtol=1e-5, atol=1e-5)


def test_set_objective_matches_definition():
    a, pid, emb, K, k, gamma, eps, _ = make_problem(7)
    members = np.arange(min(a.size, 12))
    got = set_objective(a, pid, emb, members, knn_k=k, gamma=gamma, eps=eps)
    assert abs(got["F"] - objective(a.astype(np.float64), pid, emb, members, k, gamma, eps)) < 1e-4


def test_bad_input_errors():
    with pytest.raises(ValueError, match="prompt_id out of range"):
        greedy_select(np.zeros(3), np.array([0, 1, 5]), np.zeros((2, 2)), 2, progress=False)
    with pytest.raises(ValueError, match="eps"):
        greedy_select(np.zeros(3), np.array([0, 1, 1]), np.zeros((2, 2)), 2, eps=0.0,
                      progress=False)


def test_more_picks_than_pickable_is_an_error_not_a_repeat():
    """cap x prompts is not what the cap leaves (a prompt may have fewer pairs than the cap),
    and -inf candidates are never picked: asking for more must fail, not re-pick index 0."""
    emb = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    pid = np.array([0, 0, 0, 0, 0, 1])                 # cap 2 leaves 2 + 1 = 3 pickable
    a = np.arange(6, dtype=np.float32)
    with pytest.raises(ValueError, match="3 pickable"):
        greedy_select(a, pid, emb, 4, knn_k=1, cap_per_prompt=2, progress=False)
    got = greedy_select(a, pid, emb, 3, knn_k=1, cap_per_prompt=2, progress=False)
    assert len(set(got.order.tolist())) == 3 and np.isfinite(got.gains).all()
    with pytest.raises(ValueError, match="1 pickable"):
        greedy_select(np.array([1.0, -np.inf, -np.inf], np.float32), np.array([0, 1, 1]), emb,
                      2, knn_k=1, progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_from_origin_matches_brute_force(seed):
    """Embeddings offset far from the origin (distances unchanged): the float32 |x|^2 + |y|^2
    - 2xy form must not lose the distances to cancellation."""
    a, pid, emb, K, k, gamma, eps, cap = make_problem(seed)
    emb = emb * np.float32(0.05) + np.float32(300.0)
    want = brute_force_greedy(a.astype(np.float64), pid, emb, K, k, gamma, eps, cap)
    got = greedy_select(a, pid, emb, K, knn_k=k, gamma=gamma, eps=eps, cap_per_prompt=cap,
                        chunk=4, progress=False)
    np.testing.assert_array_equal(got.order, want)


def test_non_finite_embedding_is_refused():
    a, pid, emb, K, k, gamma, eps, cap = make_problem(1)
    emb[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"emb has NaN or inf in rows \[2\]"):
        greedy_select(a, pid, emb, K, knn_k=k, progress=False)
    emb[2, 0] = 1e20
    with pytest.raises(ValueError, match="overflow"):
        greedy_select(a, pid, emb, K, knn_k=k, progress=False)


def test_close_but_unequal_gains_are_not_ties():
    """While |S| < k the gains are a_j exactly: a 1e-5 difference decides, not the index."""
    a = np.array([3.0, 3.00003, 0.0, 0.0], np.float32)
    emb = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    got = greedy_select(a, np.arange(4), emb, 1, knn_k=2, progress=False)
    assert got.order.tolist() == [1]
