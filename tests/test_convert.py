"""recjpq.convert: PQ of trained item tables (k-means, SVD, OPQ), PQEmbedding.from_dense, finetune."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recjpq.convert import RotatedPQEmbedding, finetune, quantize
from recjpq.nn import PQEmbedding


def decode(codes, centroids, rotation=None):
    x = centroids[torch.arange(centroids.shape[0]), codes.long()].flatten(1)
    return x if rotation is None else x @ rotation.T


def clustered(num_clusters=60, per_cluster=10, dim=32, spread=0.02, seed=0):
    """Items in tight, well-separated clusters (centres on a sphere of radius 4)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_clusters, dim, generator=g), dim=1) * 4
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def neighbour_recall(reference, approx, k=10):
    """Mean overlap of each row's k nearest rows (squared L2) under the two tables."""
    def knn(x):
        return torch.cdist(x, x).topk(k, dim=1, largest=False).indices
    a, b = knn(reference), knn(approx)
    return sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b)) / (k * len(a))


@pytest.mark.parametrize("method,rotate", [("kmeans", False), ("kmeans", True), ("svd", False)])
def test_clustered_top10_neighbours_recovered(method, rotate):
    weight, labels = clustered()
    out = quantize(weight, num_splits=8, num_codes=256, method=method, rotate=rotate, iters=10, opq_iters=3)
    approx = decode(*out)
    assert neighbour_recall(weight, approx) >= 0.98
    # each item's 10 nearest reconstructed items are its own cluster
    nearest = torch.cdist(approx, approx).topk(10, dim=1, largest=False).indices
    assert (labels[nearest] == labels[:, None]).float().mean() >= 0.98


def test_inner_product_top10_of_cluster_queries():
    weight, labels = clustered(per_cluster=10)
    codes, centroids = quantize(weight, 8, iters=10)
    queries = weight[::10] + 0.01  # one per cluster: its top-10 by inner product is the cluster
    dense = (queries @ weight.T).topk(10).indices
    pq = (queries @ decode(codes, centroids).T).topk(10).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(dense, pq))


def test_outputs_shapes_dtypes_and_determinism():
    weight = torch.randn(301, 12)
    codes, centroids = quantize(weight, 3, 16, iters=3, seed=1)
    assert codes.shape == (301, 3) and codes.dtype == torch.uint8 and codes.is_contiguous()
    assert centroids.shape == (3, 16, 4) and centroids.dtype == torch.float32
    assert int(codes.max()) < 16
    again = quantize(weight, 3, 16, iters=3, seed=1)
    assert torch.equal(codes, again[0]) and torch.equal(centroids, again[1])
    wide, _ = quantize(torch.randn(700, 4), 2, 300, iters=2)
    assert wide.dtype == torch.int16 and int(wide.max()) < 300


def test_kmeans_beats_one_shot_svd_and_lowers_with_iters():
    weight = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3))

    def error(**kw):
        return float((decode(*quantize(weight, 4, 32, **kw)) - weight).square().mean())
    assert error(method="kmeans", iters=20) < error(method="kmeans", iters=1)
    assert error(method="kmeans", iters=20) < error(method="svd")


def test_rotation_is_orthogonal_and_helps_unbalanced_subspaces():
    # all the variance sits in the first split's coordinates: OPQ spreads it over the splits
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([8.0, 6.0, 5.0, 4.0] + [0.1] * 12)
    weight = torch.randn(1500, 16, generator=g) * scales
    codes, centroids, rotation = quantize(weight, 4, 16, rotate=True, iters=10, opq_iters=5)
    assert torch.allclose(rotation @ rotation.T, torch.eye(16), atol=1e-4)
    plain = float((decode(*quantize(weight, 4, 16, iters=10)) - weight).square().mean())
    rotated = float((decode(codes, centroids, rotation) - weight).square().mean())
    assert rotated < 0.8 * plain


def test_padding_row_left_out_of_the_fit():
    weight, _ = clustered(num_clusters=20, per_cluster=5)
    weight = torch.cat([torch.zeros(1, weight.shape[1]), weight])
    codes, centroids = quantize(weight, 4, 32, iters=5, padding_idx=0)
    assert codes.shape[0] == 101
    # no centroid was spent on the zero row: none of them sits at the origin
    assert float(centroids.norm(dim=-1).min()) > 0.5


@pytest.mark.parametrize("kw,err", [
    (dict(num_splits=5), ValueError), (dict(num_splits=0), ValueError), (dict(num_codes=0), ValueError),
    (dict(method="opq"), ValueError), (dict(iters=0), ValueError), (dict(padding_idx=40), ValueError),
    (dict(train_size=0), ValueError)])
def test_bad_arguments(kw, err):
    args = dict(num_splits=4)
    args.update(kw)
    with pytest.raises(err):
        quantize(torch.randn(40, 8), **args)


def test_bad_weight():
    with pytest.raises(TypeError, match="weight"):
        quantize([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="weight"):
        quantize(torch.randn(4), 2)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("nan")]]), 1)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 80), m=st.sampled_from([1, 2, 3]), dsub=st.integers(1, 3), k=st.integers(1, 40),
       method=st.sampled_from(["kmeans", "svd"]), seed=st.integers(0, 3))
def test_fuzz_valid_codes_and_exact_when_k_covers_n(n, m, dsub, k, method, seed):
    weight = torch.randn(n, m * dsub, generator=torch.Generator().manual_seed(seed))
    codes, centroids = quantize(weight, m, k, method=method, iters=3, seed=seed)
    assert codes.shape == (n, m) and centroids.shape == (m, k, dsub)
    assert 0 <= int(codes.min()) and int(codes.max()) < k
    assert torch.isfinite(centroids).all()
    if method == "kmeans" and k >= n:  # one centroid per row is reachable: k-means seeds on the rows
        assert torch.allclose(decode(codes, centroids), weight, atol=1e-3)


def test_from_dense_keeps_ids_padding_and_scores():
    weight, _ = clustered(num_clusters=30, per_cluster=10, dim=16)
    dense = nn.Embedding(301, 16, padding_idx=0)
    with torch.no_grad():
        dense.weight[1:] = weight
        dense.weight[0] = 0
    pq = PQEmbedding.from_dense(dense, 4, 64, iters=10)
    assert type(pq) is PQEmbedding and pq.padding_idx == 0 and pq.num_embeddings == 301
    assert torch.allclose(pq.weight[1:], weight, atol=0.1)
    assert torch.equal(pq.weight[0], torch.zeros(16))
    q = torch.randn(4, 16)
    values, ids = pq.topk(q, 5)
    by_hand = (q @ pq.weight.T).index_fill(1, torch.tensor([0]), float("-inf"))
    assert (ids != 0).all()
    assert torch.allclose(values, by_hand.topk(5).values, atol=1e-4)  # items sharing codes tie exactly
    assert torch.allclose(torch.gather(by_hand, 1, ids), values, atol=1e-4)


def test_from_dense_rotated():
    dense = torch.randn(200, 8) * torch.tensor([5.0, 4, 3, 2, 0.1, 0.1, 0.1, 0.1])
    pq = PQEmbedding.from_dense(dense, 2, 16, rotate=True, iters=5, opq_iters=3)
    assert isinstance(pq, RotatedPQEmbedding) and pq.padding_idx is None
    q = torch.randn(3, 8)
    table = pq.weight  # decoded and rotated back
    assert torch.allclose(pq.score_all(q), q @ table.T, atol=1e-4)
    assert torch.allclose(pq.score(q, torch.tensor([3, 7])), (q @ table[[3, 7]].T), atol=1e-4)
    values, ids = pq.topk(q, 6)
    assert torch.allclose(values, (q @ table.T).topk(6).values, atol=1e-4)  # items sharing codes tie
    assert torch.allclose(torch.gather(q @ table.T, 1, ids), values, atol=1e-4)
    with pytest.raises(TypeError, match="embedding"):
        PQEmbedding.from_dense("table", 2)


def test_finetune_trains_subitems_only():
    g = torch.Generator().manual_seed(5)
    target_table = torch.randn(120, 8, generator=g)
    pq = PQEmbedding.from_dense(target_table, 2, 8, iters=3)
    codes = pq.codes.clone()
    other = nn.Parameter(torch.ones(8))
    queries = torch.randn(64, 8, generator=g)

    def loss_fn():  # distil the dense scores, through a parameter that must stay put
        return (pq.score_all(queries * other) - queries @ target_table.T).square().mean()
    losses = finetune(pq, loss_fn, 30, lr=0.05)
    assert losses[-1] < losses[0]
    assert torch.equal(pq.codes, codes) and torch.equal(other.detach(), torch.ones(8)) and other.grad is None
    with pytest.raises(TypeError, match="PQEmbedding"):
        finetune(nn.Embedding(3, 2), loss_fn, 1)
    with pytest.raises(ValueError, match="steps"):
        finetune(pq, loss_fn, 0)
