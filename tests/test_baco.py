"""BACO: balanced co-clustering (recjpq.codes.co_cluster), baco item codes and ClusterEmbedding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recjpq.codes import assign_codes, baco, co_cluster
from recjpq.nn import ClusterEmbedding


def nmi(a, b) -> float:
    """Normalised mutual information of two labelings (arithmetic-mean normalisation)."""
    a = np.unique(np.asarray(a), return_inverse=True)[1]
    b = np.unique(np.asarray(b), return_inverse=True)[1]
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum()

    def entropy(p):
        return -(p[p > 0] * np.log(p[p > 0])).sum()

    return 2.0 * mi / (entropy(pa) + entropy(pb))


def planted(num_users=240, num_items=120, groups=6, per_user=8, noise=1, seed=0):
    """Users and items in equal-size groups; each user picks ``per_user`` items of its group and
    ``noise`` random items."""
    rng = np.random.default_rng(seed)
    user_group, item_group = np.arange(num_users) % groups, np.arange(num_items) % groups
    users, items = [], []
    for u in range(num_users):
        own = rng.choice(np.flatnonzero(item_group == user_group[u]), per_user, replace=False)
        picked = np.concatenate([own, rng.integers(0, num_items, noise)])
        users += [u] * picked.size
        items += picked.tolist()
    return (np.array(users), np.array(items)), user_group, item_group


def random_log(num_users=60, num_items=90, nnz=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_users, nnz), rng.integers(0, num_items, nnz)


# ---------------------------------------------------------------- item codes


@pytest.mark.parametrize("num_items,num_splits,num_codes", [(90, 3, 8), (301, 5, 16), (90, 1, 256)])
def test_baco_codes_balanced_and_valid(num_items, num_splits, num_codes):
    log = random_log(num_items=num_items, nnz=8 * num_items)
    codes = assign_codes(log, num_items, num_splits, num_codes, strategy="baco", seed=1)
    assert codes.shape == (num_items, num_splits) and codes.dtype == torch.uint8
    mean = num_items / num_codes
    for m in range(num_splits):
        counts = np.bincount(codes[:, m].numpy(), minlength=num_codes)
        assert counts.size == num_codes
        if mean >= 1:  # mean -/+ max(5%, 2 items), never empty
            room = max(0.05 * mean, min(2.0, mean))
            assert counts.min() >= max(math.floor(mean - room), 1) and counts.max() <= math.ceil(mean + room), counts
        else:  # fewer items than codes: every item has a code of its own
            assert counts.max() == 1


def test_baco_codes_refine_and_stay_balanced_on_structure():
    (users, items), _, item_group = planted(num_users=300, num_items=160, groups=8, per_user=10)
    coded = baco.item_codes((users, items), 160, num_splits=4, num_codes=8, seed=0, refined_splits=2, sweeps=5)
    for m in range(4):
        counts = np.bincount(coded[:, m].numpy(), minlength=8)
        assert counts.min() >= 18 and counts.max() <= 22  # 160 / 8 = 20, room max(5%, 2 items)
    # refined splits follow the planted groups at least as well as the spectral seeds
    assert nmi(item_group, coded[:, 0].numpy()) > 0.8


def test_baco_refinement_moves_small_codes_and_raises_the_objective():
    """Codes of ~10 items (where 5% slack is under one item) still trade items, the objective grows,
    and the report separates per-sweep moves from the per-split summary."""
    (users, items), _, item_group = planted(num_users=400, num_items=320, groups=16, per_user=10, noise=3, seed=2)
    start = baco.item_codes((users, items), 320, num_splits=2, num_codes=32, refined_splits=0)
    seen = []
    coded = baco.item_codes((users, items), 320, num_splits=2, num_codes=32, refined_splits=1, progress=seen.append)
    assert torch.equal(coded[:, 1], start[:, 1])  # unrefined split: the spectral codes
    changed = float((coded[:, 0] != start[:, 0]).double().mean())
    summary = [r for r in seen if "items_changed" in r]
    sweeps = [r for r in seen if "items_moved" in r]
    assert len(summary) == 1 and summary[0]["items_changed"] == pytest.approx(changed, abs=1e-6)
    assert changed > 0.05
    assert summary[0]["modularity_after"] > summary[0]["modularity_before"]
    assert summary[0]["intra_after"] > summary[0]["intra_before"]
    assert sum(r["items_moved"] for r in sweeps) >= changed * 320
    assert 1 <= summary[0]["sweeps"] == len(sweeps) <= 10
    counts = np.bincount(coded[:, 0].numpy(), minlength=32)
    assert counts.min() >= 8 and counts.max() <= 12  # 10 items per code, room 2
    assert nmi(item_group, coded[:, 0].numpy()) >= nmi(item_group, start[:, 0].numpy())


def test_baco_codes_same_for_any_thread_count():
    """Float reductions split by thread count must not reorder items: 1 and 2 threads agree."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 3000, 40000)
    items = np.where(rng.random(40000) < 0.6, (users % 40) * 50 + rng.integers(0, 50, 40000),
                     rng.zipf(1.5, 40000) % 2000)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append((baco.item_codes((users, items), 2000, 4, 64, seed=0, sweeps=3),
                         co_cluster((users, items), 40, num_secondary=8, alpha=0.5, sweeps=3, seed=0)))
    finally:
        torch.set_num_threads(threads)
    (codes1, cc1), (codes2, cc2) = runs
    assert torch.equal(codes1, codes2)
    assert all(torch.equal(x, y) for x, y in zip(cc1[:3], cc2[:3]))


def test_item_spectrum_same_for_any_thread_count():
    """At this size (Toys-like: 20k users, 12k items) multi-threaded BLAS changes the spectrum's
    last bits, which reordered 0.4% of Toys item codes before the spectrum ran on one thread."""
    rng = np.random.default_rng(5)
    users = rng.integers(0, 20000, 170000)
    items = np.where(rng.random(170000) < 0.6, (users % 40) * 300 + rng.integers(0, 300, 170000),
                     rng.zipf(1.5, 170000) % 12000)
    u, i, w, nu, ni = baco._edges((users, items), None, 12000, None)
    _, item_side = baco._sides(u, i, w, nu, ni, 0.0)
    threads = torch.get_num_threads()
    spectra = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            spectra.append(baco._item_spectrum(item_side, nu, 8, torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert torch.equal(spectra[0], spectra[1])


def test_spectral_strategy_is_the_unrefined_baco_start():
    log = random_log(num_users=200, num_items=500, nnz=5000)
    spectral = assign_codes(log, 500, 4, 16, strategy="spectral", seed=2)
    start = baco.item_codes(log, 500, 4, 16, seed=2, refined_splits=0)
    assert spectral.dtype == torch.uint8 and torch.equal(spectral, start.to(torch.uint8))
    assert not torch.equal(spectral, assign_codes(log, 500, 4, 16, strategy="baco", seed=2))


def test_baco_codes_large_code_books_use_wider_dtype():
    log = random_log(num_items=400, nnz=2000)
    codes = assign_codes(log, 400, 2, 300, strategy="baco")
    assert codes.dtype == torch.int16 and int(codes.max()) < 300


def test_baco_codes_deterministic_per_seed():
    log = random_log()
    a = assign_codes(log, 90, 4, 8, strategy="baco", seed=3)
    b = assign_codes(log, 90, 4, 8, strategy="baco", seed=3)
    c = assign_codes(log, 90, 4, 8, strategy="baco", seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_baco_codes_near_unique_tuples():
    log = random_log(num_users=200, num_items=500, nnz=5000)
    codes = assign_codes(log, 500, 4, 16, strategy="baco")
    assert np.unique(codes.numpy(), axis=0).shape[0] >= 0.95 * 500


def test_baco_codes_items_without_interactions():
    users, items = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    codes = assign_codes((users, items), 40, 3, 4, strategy="baco")
    assert codes.shape == (40, 3)
    counts = [np.bincount(codes[:, m].numpy(), minlength=4) for m in range(3)]
    assert all(c.sum() == 40 and c.min() >= 8 and c.max() <= 12 for c in counts)  # 10 per code, room 2


# ---------------------------------------------------------------- co-clustering


@pytest.mark.parametrize("seed", [0, 1])
def test_co_cluster_recovers_planted_groups(seed):
    log, user_group, item_group = planted(seed=seed)
    cc = co_cluster(log, 6, seed=seed)
    assert nmi(item_group, cc.item_clusters.numpy()) > 0.9
    assert nmi(user_group, cc.user_clusters.numpy()) > 0.8
    # co-clusters: a user's label is the label of most of its items
    agree = (cc.user_clusters[torch.from_numpy(log[0])] == cc.item_clusters[torch.from_numpy(log[1])]).float().mean()
    assert agree > 0.7


def test_co_cluster_balance_and_secondary():
    log = random_log(num_users=200, num_items=150, nnz=2000, seed=2)
    cc = co_cluster(log, 10, num_secondary=7, slack=0.2, alpha=0.0)
    assert cc.user_clusters.dtype == torch.int64 and cc.user_clusters.shape == (200,)
    assert cc.item_clusters.shape == (150,) and cc.secondary_user_clusters.shape == (200,)
    expected = ((cc.user_clusters, 10, 200), (cc.item_clusters, 10, 150), (cc.secondary_user_clusters, 7, 200))
    for labels, k, n in expected:
        counts = np.bincount(labels.numpy(), minlength=k)
        assert counts.size == k and counts.min() >= math.floor(0.8 * n / k) and counts.max() <= math.ceil(1.2 * n / k)
    assert (cc.num_clusters, cc.num_secondary) == (10, 7)


def test_co_cluster_without_secondary_and_inputs_agree():
    users, items = random_log(seed=5)
    mat = sp.coo_matrix((np.ones(users.size), (users, items)), shape=(60, 90))
    pair = co_cluster((torch.from_numpy(users), torch.from_numpy(items)), 5, num_users=60, num_items=90, seed=7)
    from_scipy = co_cluster(mat, 5, seed=7)
    from_torch = co_cluster(torch.from_numpy(mat.toarray()).to_sparse(), 5, seed=7)
    assert pair.secondary_user_clusters is None
    for other in (from_scipy, from_torch):
        assert torch.equal(pair.user_clusters, other.user_clusters)
        assert torch.equal(pair.item_clusters, other.item_clusters)


def test_co_cluster_deterministic_and_reports_progress():
    log = random_log(seed=6)
    seen = []
    a = co_cluster(log, 4, num_secondary=3, seed=11, progress=seen.append)
    b = co_cluster(log, 4, num_secondary=3, seed=11)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert seen and {"stage", "sweep", "users_moved", "items_moved", "seconds"} <= set(seen[0])


def test_co_cluster_popular_items_alone_with_volume_weights():
    """alpha = 1 balances edge volume: the hub item is heavier than a cluster's share, so it keeps
    a cluster to itself."""
    rng = np.random.default_rng(0)
    users = np.concatenate([np.arange(100), rng.integers(0, 100, 300)])
    items = np.concatenate([np.zeros(100, dtype=np.int64), rng.integers(1, 60, 300)])
    cc = co_cluster((users, items), 8, alpha=1.0, seed=0)
    hub = int(cc.item_clusters[0])
    assert int((cc.item_clusters == hub).sum()) <= 2


def test_co_cluster_more_clusters_than_nodes():
    cc = co_cluster((np.array([0, 1, 2]), np.array([0, 1, 1])), 5)
    assert int(cc.item_clusters.max()) < 5 and cc.item_clusters.unique().numel() == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_co_cluster_on_gpu():
    log, _, item_group = planted()
    cc = co_cluster(tuple(torch.from_numpy(x).cuda() for x in log), 6)
    assert cc.item_clusters.is_cuda and nmi(item_group, cc.item_clusters.cpu().numpy()) > 0.9


# ---------------------------------------------------------------- internals against a brute-force view


def test_dense_and_sparse_label_scores_agree():
    users, items = random_log(num_users=30, num_items=40, nnz=300, seed=9)
    users, items, weights, nu, ni = baco._edges((users, items), None, None, None)
    user_side, _ = baco._sides(users, items, weights, nu, ni, 0.0)
    g = torch.Generator().manual_seed(0)
    k = 7
    own, other = torch.randint(0, k, (nu,), generator=g), torch.randint(0, k, (ni,), generator=g)
    load = torch.bincount(own, minlength=k).double()
    # gamma a power of two, unit weights, integer loads: every score is exact, so ties must agree
    dense = baco._best_labels_dense(user_side, own, other, load, 0.25, k)
    sparse = baco._best_labels_sparse(user_side, own, other, load, 0.25, k)
    assert torch.equal(dense[0], sparse[0]) and torch.equal(dense[1], sparse[1])
    # brute force: the objective change of each single move
    counts = torch.zeros(nu, k, dtype=torch.float64)
    counts.index_put_((users, other[items]), weights.double(), accumulate=True)
    score = counts - 0.25 * (load[None, :] - (torch.arange(k)[None, :] == own[:, None]).double())
    assert torch.equal(dense[0], score.argmax(1))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.floats(0.0, 0.5), st.integers(0, 2**31 - 1))
def test_accepted_moves_keep_bounds(n, k, slack, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    src, dst = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    gain = torch.rand(n, generator=g, dtype=torch.float64)
    load = torch.zeros(k, dtype=torch.float64).index_add_(0, src, weight)
    mean = float(weight.sum()) / k
    lo, hi = (1 - slack) * mean, (1 + slack) * mean
    ok = baco._accept(src, dst, gain, weight, load, lo, hi, k)
    final = load - torch.zeros_like(load).index_add_(0, src[ok], weight[ok]) + torch.zeros_like(load).index_add_(
        0, dst[ok], weight[ok])
    assert bool((final <= torch.clamp(load, min=hi) + 1e-9).all())
    assert bool((final >= torch.clamp(load, max=lo) - 1e-9).all())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("log,kwargs,error,match", [
    ((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), {}, ValueError, "empty"),
    ((np.array([0, -1]), np.array([0, 1])), {}, ValueError, "user_ids"),
    ((np.array([0, 1]), np.array([0, 5])), {"num_items": 5}, ValueError, "item_ids"),
    ((np.array([0, 3]), np.array([0, 1])), {"num_users": 3}, ValueError, "user_ids"),
    ((np.array([0, 1]), np.array([0])), {}, ValueError, "differ in length"),
    ((np.array([0.0, 1.0]), np.array([0, 1])), {}, TypeError, "integers"),
    ((np.array([[0, 1]]), np.array([[0, 1]])), {}, ValueError, "1-D"),
    ("not a graph", {}, TypeError, "interactions"),
    ((np.array([0, 1]), np.array([0, 1])), {"alpha": 2.0}, ValueError, "alpha"),
    ((np.array([0, 1]), np.array([0, 1])), {"slack": -0.1}, ValueError, "slack"),
    ((np.array([0, 1]), np.array([0, 1])), {"move_fraction": 0.0}, ValueError, "move_fraction"),
    ((np.array([0, 1]), np.array([0, 1])), {"num_secondary": -1}, ValueError, "num_secondary"),
    ((np.array([0, 1]), np.array([0, 1])), {"progress": "yes"}, TypeError, "progress"),
])
def test_co_cluster_rejects_bad_input(log, kwargs, error, match):
    with pytest.raises(error, match=match):
        co_cluster(log, 2, **kwargs)


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_co_cluster_rejects_bad_cluster_count(k):
    with pytest.raises(ValueError, match="num_clusters"):
        co_cluster((np.array([0]), np.array([0])), k)


def test_co_cluster_rejects_matrix_of_wrong_shape_and_bad_weights():
    with pytest.raises(ValueError, match="shape"):
        co_cluster(sp.eye(4, 5, format="csr"), 2, num_items=6)
    with pytest.raises(ValueError, match="weights"):
        co_cluster(sp.csr_matrix(np.array([[1.0, -1.0]])), 2)


def test_baco_codes_reject_bad_input():
    with pytest.raises(ValueError, match="item_ids"):
        assign_codes((np.array([0, 1]), np.array([0, 9])), 5, 2, 4, strategy="baco")
    with pytest.raises(ValueError, match="empty"):
        assign_codes((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), 5, 2, 4, strategy="baco")


# ---------------------------------------------------------------- multi-level codes


def test_level_codes_start_with_co_clusters_and_add_unique_combinations():
    log, _, item_group = planted(seed=0)
    codes = baco.level_codes(log, [6, 5, 4], seed=0)
    assert codes.user_codes.shape == (240, 3) and codes.item_codes.shape == (120, 3) and codes.num_rows == (6, 5, 4)
    assert codes.user_codes.dtype == torch.int64
    first = co_cluster(log, 6, seed=0)
    assert torch.equal(codes.user_codes[:, 0], first.user_clusters)
    assert torch.equal(codes.item_codes[:, 0], first.item_clusters)
    for j, k in enumerate(codes.num_rows):
        assert int(codes.item_codes[:, j].min()) >= 0 and int(codes.item_codes[:, j].max()) < k
        assert int(codes.user_codes[:, j].max()) < k
    assert nmi(item_group, codes.item_codes[:, 0].numpy()) > 0.9
    # later levels describe the residual graph: new information, so far more distinct row combinations
    assert nmi(codes.item_codes[:, 0].numpy(), codes.item_codes[:, 1].numpy()) < 0.5
    assert torch.unique(codes.item_codes, dim=0).shape[0] > 4 * torch.unique(codes.item_codes[:, 0]).numel()
    again = baco.level_codes(log, [6, 5, 4], seed=0)
    assert torch.equal(codes.item_codes, again.item_codes) and torch.equal(codes.user_codes, again.user_codes)
    emb = ClusterEmbedding(codes.item_codes, 8, list(codes.num_rows))
    assert emb(torch.arange(120)).shape == (120, 8) and emb.weight.shape == (15, 8)


@pytest.mark.parametrize("num_rows,error,match", [
    ([], ValueError, "num_rows"),
    (4, ValueError, "num_rows"),
    ([4, 0], ValueError, r"num_rows\[1\]"),
    ([4, 2.5], ValueError, r"num_rows\[1\]"),
])
def test_level_codes_reject_bad_row_counts(num_rows, error, match):
    with pytest.raises(error, match=match):
        baco.level_codes(random_log(), num_rows)


def test_level_codes_reject_empty_graph():
    with pytest.raises(ValueError, match="empty"):
        baco.level_codes((np.array([], dtype=np.int64), np.array([], dtype=np.int64)), [2, 2])


# ---------------------------------------------------------------- ClusterEmbedding


def test_cluster_embedding_sums_shared_rows():
    ids = torch.tensor([[0, 1], [2, 0], [0, 1], [1, 2]])
    emb = ClusterEmbedding(ids, 4, num_rows=[3, 3])
    assert emb.weight.shape == (6, 4) and emb.num_rows == (3, 3)
    query = torch.tensor([[3, 0], [2, 1]])
    expected = emb.weight[ids[:, 0]] + emb.weight[3 + ids[:, 1]]
    assert torch.equal(emb(query), expected[query])
    emb(torch.tensor([0, 2])).sum().backward()
    assert emb.weight.grad[[0, 4]].abs().sum() > 0 and emb.weight.grad[[1, 2, 3, 5]].abs().sum() == 0
    assert "rows" in emb.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cluster_embedding_all_rows_matches_forward_and_its_gradient(dtype):
    """all_rows (a sparse product) against forward over every id, values and weight gradients; an
    entity that uses one row twice counts it twice; new ids from load_state_dict are followed."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (40, 3), generator=g)
    ids[0] = torch.tensor([2, 2, 2])
    emb = ClusterEmbedding(ids, 6, num_rows=[5, 5, 5]).to(dtype)
    coef = torch.randn(40, 6, generator=g, dtype=dtype)
    got = emb.all_rows()
    (got * coef).sum().backward()
    grad, emb.weight.grad = emb.weight.grad, None
    want = emb(torch.arange(40))
    (want * coef).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, emb.weight.grad)
    other = ClusterEmbedding(ids.flip(0), 6, num_rows=[5, 5, 5]).to(dtype)
    emb.load_state_dict(other.state_dict())  # copies the ids into the same buffer
    torch.testing.assert_close(emb.all_rows(), other.all_rows())


def test_cluster_embedding_single_column_is_a_lookup():
    emb = ClusterEmbedding(torch.tensor([1, 1, 0], dtype=torch.int32), 3)
    assert emb.weight.shape == (2, 3)
    assert torch.equal(emb(torch.tensor([0, 1])), emb.weight[[1, 1]])


@pytest.mark.parametrize("ids,dim,num_rows,error,match", [
    (torch.tensor([0.0, 1.0]), 2, None, TypeError, "cluster_ids"),
    (torch.tensor([0, -1]), 2, None, ValueError, ">= 0"),
    (torch.tensor([0, 4]), 2, 3, ValueError, "num_rows"),
    (torch.tensor([[0, 1]]), 2, [2], ValueError, "columns"),
    (torch.tensor([0, 1]), 0, None, ValueError, "dim"),
    (torch.zeros(0, dtype=torch.int64), 2, None, ValueError, "non-empty"),
])
def test_cluster_embedding_rejects_bad_arguments(ids, dim, num_rows, error, match):
    with pytest.raises(error, match=match):
        ClusterEmbedding(ids, dim, num_rows)


def test_cluster_embedding_rejects_out_of_range_ids():
    emb = ClusterEmbedding(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="ids must lie"):
        emb(torch.tensor([3]))
    with pytest.raises(TypeError, match="ids"):
        emb(torch.tensor([0.5]))
