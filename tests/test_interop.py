"""recjpq.interop: PQEmbedding <-> faiss.IndexPQ keeps codes, centroids and the top-k."""
from __future__ import annotations

import pytest
import torch

from recjpq.convert import quantize
from recjpq.interop import from_faiss, to_faiss
from recjpq.nn import PQEmbedding

faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu)")


def random_embedding(n=777, m=5, dsub=3, seed=0, padding_idx=None):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, m), generator=g).to(torch.uint8)
    pq = PQEmbedding(codes, m * dsub, 256, padding_idx)
    with torch.no_grad():
        pq.subitem_embeddings.copy_(torch.randn(m, 256, dsub, generator=g))
    return pq


@pytest.mark.parametrize("n,m,dsub,k", [(777, 5, 3, 10), (300, 3, 4, 300), (1000, 8, 2, 1)])
def test_search_matches_pq_topk(n, m, dsub, k):
    pq = random_embedding(n, m, dsub)
    index = to_faiss(pq)
    assert isinstance(index, faiss.IndexPQ) and index.ntotal == n and index.metric_type == faiss.METRIC_INNER_PRODUCT
    queries = torch.randn(7, m * dsub, generator=torch.Generator().manual_seed(1))
    distances, labels = index.search(queries.numpy(), k)
    values, ids = pq.topk(queries, k)
    assert torch.equal(torch.from_numpy(labels), ids)
    assert torch.allclose(torch.from_numpy(distances), values, atol=1e-4)


def test_round_trip_identical():
    pq = random_embedding(seed=2)
    back = from_faiss(to_faiss(pq))
    assert torch.equal(back.codes, pq.codes) and back.codes.dtype == torch.uint8
    assert torch.equal(back.subitem_embeddings, pq.subitem_embeddings)
    queries = torch.randn(4, pq.embedding_dim)
    for a, b in zip(back.topk(queries, 20), pq.topk(queries, 20)):
        assert torch.equal(a, b)


def test_from_quantize_pair_and_padding():
    weight = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    codes, centroids = quantize(weight, 4, iters=3)
    index = to_faiss((codes, centroids))
    back = from_faiss(index, padding_idx=0)
    assert back.padding_idx == 0 and torch.equal(back.codes, codes)
    _, ids = back.topk(weight[:3], 5)
    assert (ids != 0).all()


def test_index_trained_by_faiss():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(4)).numpy()
    index = faiss.IndexPQ(16, 4, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    pq = from_faiss(index)
    q = x[:5]
    _, labels = index.search(q, 10)
    assert torch.equal(pq.topk(torch.from_numpy(q), 10)[1], torch.from_numpy(labels))


def test_refusals():
    with pytest.raises(ValueError, match="K=256"):
        to_faiss((torch.zeros(5, 2, dtype=torch.uint8), torch.randn(2, 16, 4)))
    with pytest.raises(ValueError, match="splits"):
        to_faiss((torch.zeros(5, 3, dtype=torch.uint8), torch.randn(2, 256, 4)))
    with pytest.raises(TypeError, match="source"):
        to_faiss(torch.zeros(3))
    rotated = PQEmbedding.from_dense(torch.randn(300, 8), 2, rotate=True, iters=2, opq_iters=1)
    with pytest.raises(ValueError, match="rotation"):
        to_faiss(rotated)
    x = torch.randn(1000, 8).numpy()
    l2 = faiss.IndexPQ(8, 2, 8)
    l2.train(x)
    l2.add(x)
    with pytest.raises(ValueError, match="INNER_PRODUCT"):
        from_faiss(l2)
    with pytest.raises(TypeError, match="IndexPQ"):
        from_faiss(faiss.IndexFlatIP(8))
    empty = faiss.IndexPQ(8, 2, 8, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match="trained"):
        from_faiss(empty)
