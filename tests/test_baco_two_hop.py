"""The C++ kernels of BACO's item-code refinement (csrc/cpu/baco_two_hop.cpp) against the pure-torch
reference (``baco._TwoHop``) and a dense brute force, on awkward shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recjpq.codes import baco

pytestmark = pytest.mark.skipif(not baco._native_two_hop(torch.device("cpu")),
                                reason="recjpq._C is missing (RECJPQ_NO_EXT=1) or predates the kernels")


def weighted_log(num_users, num_items, nnz, seed, repeats=True):
    """A log with items of no edge and, with ``repeats``, repeated pairs (integer weights 1-3, so
    users whose edges carry different weights)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, nnz)
    items = np.minimum(rng.pareto(1.0, nnz) * num_items / 10, num_items - 3).astype(np.int64)  # 2 items without
    if repeats:
        again = rng.random(nnz) < 0.3
        users = np.concatenate([users, users[again], users[again][:5]])
        items = np.concatenate([items, items[again], items[again][:5]])
    return users, items


def two_hops(log, num_items, k):
    users, items, weights, nu, ni = baco._edges(log, None, num_items, None)
    user_side, item_side = baco._sides(users, items, weights, nu, ni, 0.0)
    return baco._TwoHop(user_side, item_side), baco._NativeTwoHop(user_side, item_side, k)


def brute_force(two_hop, codes, k, gamma):
    """Dense ``S = B^T diag(1 / deg) B Y`` without the diagonal, then every item's best code and gain."""
    users, items = two_hop.users, two_hop.items
    b = np.zeros((users.num_nodes, items.num_nodes))
    np.add.at(b, (users.src.numpy(), users.dst.numpy()), users.wt.double().numpy())
    v = np.zeros_like(b)
    v[users.src.numpy(), users.dst.numpy()] = two_hop.user_value.numpy()  # on the grid: about b / deg(u)
    pairs = b.T @ v
    np.fill_diagonal(pairs, 0.0)
    s = pairs @ np.eye(k)[codes.numpy()]
    strength = two_hop.strength.numpy()
    volume = np.bincount(codes.numpy(), weights=strength, minlength=k)
    own = codes.numpy()
    score = s - gamma * strength[:, None] * (volume[None, :] - strength[:, None] * (np.arange(k) == own[:, None]))
    rows = np.arange(len(own))
    return score.argmax(1), score.max(1) - score[rows, own], float(s[rows, own].sum())


@pytest.mark.parametrize("k", [2, 5, 24, 64, 256, 300])
@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("dense_budget", [None, 4])
def test_native_two_hop_matches_reference_and_brute_force(k, repeats, dense_budget, monkeypatch):
    """Users with more than K / 2 edges come as dense rows (all of them at K = 2 and 5, some at 24,
    none from 64 on), the heaviest first within the budget (4 rows with ``dense_budget``)."""
    if dense_budget:
        monkeypatch.setattr(baco, "_DENSE_BUDGET", 2 * dense_budget * k)
    num_items = 257
    reference, native = two_hops(weighted_log(70, num_items, 900, seed=k, repeats=repeats), num_items, k)
    degree = native.users.indptr.diff()
    heavy = int((degree > k // 2).sum())
    assert native.num_dense == (min(heavy, dense_budget) if dense_budget else heavy)
    dense = torch.zeros_like(degree, dtype=torch.bool)
    dense[native.items.dst[native.dense_slot >= 0]] = True
    assert int(dense.sum()) == native.num_dense
    assert native.num_dense == 0 or int(degree[dense].min()) >= max(degree[~dense].tolist(), default=0)
    assert heavy == {2: 70, 5: 70}.get(k, heavy) and (k != 24 or 0 < heavy < 70) and (k < 64 or heavy == 0)
    g = torch.Generator().manual_seed(k)
    codes = torch.randint(0, k, (num_items,), generator=g)
    volume = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, reference.strength)
    gamma = 1.0 / reference.total
    everyone = torch.arange(num_items)
    drawn = (torch.rand(num_items, generator=g) < 0.5).nonzero().squeeze(1)
    ref_state, nat_state = reference.state(codes, k), native.state(codes, k)
    assert nat_state[0].dtype == (torch.uint8 if k <= 256 else torch.int32)
    for idx in (everyone, drawn, everyone[:1], everyone[:0]):
        best, gain = native.best(nat_state, codes, idx, volume, gamma)
        ref_best, ref_gain = reference.best(ref_state, codes, idx, volume, gamma)
        assert torch.equal(best, ref_best) and torch.equal(gain, ref_gain)
    inside = native.inside(nat_state, codes, k)
    assert inside == reference.inside(ref_state, codes, k)
    best, gain = native.best(nat_state, codes, everyone, volume, gamma)
    brute_best, brute_gain, brute_inside = brute_force(reference, codes, k, gamma)
    np.testing.assert_allclose(gain.numpy(), brute_gain, rtol=0, atol=1e-9)
    clear = brute_gain > 1e-9  # near-ties may round either way in the dense products
    assert np.array_equal(best.numpy()[clear], brute_best[clear])
    assert inside == pytest.approx(brute_inside, rel=1e-12)


def test_item_codes_same_with_and_without_the_kernels(monkeypatch):
    log = weighted_log(300, 500, 6000, seed=3)
    kwargs = dict(num_items=500, num_splits=3, num_codes=24, sweeps=4, refined_splits=2, seed=1)
    native = baco.item_codes(log, **kwargs)
    monkeypatch.setattr(baco, "_native_two_hop", lambda device: False)
    assert torch.equal(native, baco.item_codes(log, **kwargs))


def test_native_two_hop_same_for_any_thread_count():
    k = 256
    reference, native = two_hops(weighted_log(400, 3000, 20000, seed=4), 3000, k)
    codes = torch.randint(0, k, (3000,), generator=torch.Generator().manual_seed(0))
    volume = torch.zeros(k, dtype=torch.float64).index_add_(0, codes, native.strength)
    threads, runs = torch.get_num_threads(), []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            state = native.state(codes, k)
            runs.append((*native.best(state, codes, torch.arange(3000), volume, 1.0 / native.total),
                         native.inside(state, codes, k)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:2], runs[1][:2])) and runs[0][2] == runs[1][2]


def kernel_args(native, state, codes, idx, volume):
    users, items = native.users, native.items
    edge_codes, dense = state
    return [items.indptr, native.item_weight, native.user_begin, native.user_end, native.user_shared,
            native.dense_slot, dense, users.indptr, native.uniform_value, edge_codes, native.user_value, idx, codes,
            native.self_weight, native.strength, volume, 0.5]


@pytest.mark.parametrize("position,change,match", [
    (11, lambda a: torch.tensor([0, 40]), "out of range"),  # items: an id past the last item
    (12, lambda a: a[12] + 16, "out of range"),  # codes: an item's own code >= K
    (11, lambda a: a[11].double(), "contiguous 1-D Long"),
    (2, lambda a: a[3] + 1, "bad indptr"),  # user_begin past user_end
    (14, lambda a: a[14][:-1], "inconsistent sizes"),  # strength
    (0, lambda a: a[0].flip(0), "out of range"),  # a decreasing item_indptr
    (5, lambda a: a[5].clamp_min(0) + a[6].shape[0], "out of range"),  # dense_slot past the dense rows
    (6, lambda a: a[6][:, :-1], r"\[R, K\]"),  # dense rows narrower than K
])
def test_native_best_codes_rejects_bad_input(position, change, match):
    k = 16  # users with more than 8 edges come as dense rows, the others as code lists
    _, native = two_hops(weighted_log(20, 40, 200, seed=0), 40, k)
    assert 0 < native.num_dense < 19
    codes = torch.arange(40) % k
    args = kernel_args(native, native.state(codes, k), codes, torch.arange(40), torch.ones(k, dtype=torch.float64))
    args[position] = change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.recjpq_cpu.baco_best_codes(*args)


@pytest.mark.parametrize("k,dtype", [(8, torch.uint8), (300, torch.int32)])
def test_native_kernels_reject_edge_codes_out_of_range(k, dtype, monkeypatch):
    monkeypatch.setattr(baco, "_DENSE_BUDGET", 0)  # no dense rows: every user walks its code list
    _, native = two_hops(weighted_log(20, 40, 200, seed=1), 40, k)
    codes = torch.arange(40) % k
    edge_codes, dense = native.state(codes, k)
    edge_codes = edge_codes.clone()
    edge_codes[3] = k if dtype == torch.uint8 else -1
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.recjpq_cpu.baco_best_codes(*kernel_args(native, (edge_codes, dense), codes, torch.arange(40),
                                                          torch.ones(k, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="out of"):
        torch.ops.recjpq_cpu.baco_inside(native.users.indptr, native.uniform_value, edge_codes, native.user_value,
                                         native.user_weight, k)
