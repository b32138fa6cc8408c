"""Bad input gets a clear ValueError/TypeError naming the argument, before any backend runs."""
import pytest
import torch

from recjpq import ops
from recjpq.nn import PQEmbedding


@pytest.fixture
def good():
    return torch.randn(2, 3, 16), torch.randint(0, 16, (50, 3), dtype=torch.uint8)


@pytest.mark.parametrize("op", ["pq_scores", "pq_topk"])
@pytest.mark.parametrize("bad, error, match", [
    (lambda S, c: (S, c.to(torch.int64)), TypeError, "codes must have dtype"),
    (lambda S, c: (S, c.float()), TypeError, "codes must have dtype"),
    (lambda S, c: (S.int(), c), TypeError, "S must have dtype"),
    (lambda S, c: (S[0], c), ValueError, "S must have 3 dimensions"),
    (lambda S, c: (S, c[:, 0]), ValueError, "codes must have 2 dimensions"),
    (lambda S, c: (S, c[:, :2]), ValueError, "M=3 splits but codes has M=2"),
    (lambda S, c: (S[:, :, :8], c), ValueError, r"codes must lie in \[0, K=8\)"),
    (lambda S, c: (S, c.int() - 1), ValueError, r"codes must lie in \[0, K=16\)"),
    (lambda S, c: (S.index_fill(2, torch.tensor([3]), float("nan")), c), ValueError, "S contains non-finite"),
    (lambda S, c: (S.index_fill(2, torch.tensor([3]), float("inf")), c), ValueError, "S contains non-finite"),
    (lambda S, c: (S, c.to("meta")), ValueError, "codes is on meta but S is on cpu"),
    (lambda S, c: ([[1.0]], c), TypeError, "S must be a torch.Tensor"),
    (lambda S, c: (S, c[:0]), ValueError, "codes must be non-empty"),
])
def test_bad_tables(good, op, bad, error, match):
    S, codes = bad(*good)
    with pytest.raises(error, match=match):
        if op == "pq_scores":
            ops.pq_scores(S, codes)
        else:
            ops.pq_topk(S, codes, 3)


def test_uint8_codes_cannot_address_more_than_256_subids():
    with pytest.raises(ValueError, match="uint8 codes hold at most 256"):
        ops.pq_topk(torch.randn(1, 2, 300), torch.zeros(5, 2, dtype=torch.uint8), 1)


@pytest.mark.parametrize("k, error, match", [
    (0, ValueError, r"k must be in \[1, N=50\]"),
    (-1, ValueError, r"k must be in \[1, N=50\]"),
    (51, ValueError, r"k must be in \[1, N=50\]"),
    (2.0, TypeError, "k must be an int"),
    (True, TypeError, "k must be an int"),
])
def test_bad_k(good, k, error, match):
    with pytest.raises(error, match=match):
        ops.pq_topk(*good, k)


@pytest.mark.parametrize("exclude, error, match", [
    (torch.zeros(2, 3, dtype=torch.int32), TypeError, "exclude must have dtype"),
    (torch.zeros(3, 3, dtype=torch.int64), ValueError, "exclude has 3 rows but S has B=2"),
    (torch.zeros(6, dtype=torch.int64), ValueError, "exclude must have 2 dimensions"),
    (torch.tensor([[50], [0]]), ValueError, r"exclude ids must be in \[-1, N=50\)"),
    (torch.tensor([[-2], [0]]), ValueError, r"exclude ids must be in \[-1, N=50\)"),
])
def test_bad_exclude(good, exclude, error, match):
    with pytest.raises(error, match=match):
        ops.pq_topk(*good, 3, exclude=exclude)


def test_bad_backend_and_algorithm(good):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.pq_topk(*good, 3, backend="gpu")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ops.pq_topk(*good, 3, algorithm="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run pq_topk on cpu tensors"):
        ops.pq_topk(*good, 3, backend="cuda")


@pytest.mark.parametrize("query, centroids, error, match", [
    (torch.randn(2, 10), torch.randn(3, 16, 4), ValueError, "d=10 is not divisible by M=3"),
    (torch.randn(2, 12), torch.randn(3, 16, 5), ValueError, "sub-dimension 5"),
    (torch.randn(2, 12), torch.randn(3, 16), ValueError, "centroids must have 3 dimensions"),
    (torch.randint(0, 3, (2, 12)), torch.randn(3, 16, 4), TypeError, "query must have dtype"),
    (torch.randn(2, 12), torch.randn(3, 16, 4, device="meta"), ValueError, "centroids is on meta"),
])
def test_bad_subitem_scores(query, centroids, error, match):
    with pytest.raises(error, match=match):
        ops.subitem_scores(query, centroids)


def test_a_fixed_codes_tensor_is_rechecked_after_in_place_edits(good):
    S, codes = good
    ops.pq_topk(S, codes, 3)  # caches the code range
    codes[7, 1] = 200
    with pytest.raises(ValueError, match=r"got values in \[0, 200\]"):
        ops.pq_topk(S, codes, 3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"codes": torch.zeros(10, 3, dtype=torch.uint8), "dim": 10}, ValueError, "dim=10 must be divisible"),
    ({"codes": torch.full((10, 3), 20, dtype=torch.uint8), "dim": 12, "num_codes": 16}, ValueError,
     r"codes must lie in \[0, num_codes=16\)"),
    ({"codes": torch.zeros(10, 3), "dim": 12}, TypeError, "codes must have dtype"),
    ({"codes": torch.zeros(10, 3, dtype=torch.uint8), "dim": 12, "padding_idx": 10}, ValueError, "padding_idx"),
    ({"codes": torch.zeros(10, 3, dtype=torch.uint8), "dim": 12, "num_codes": 300}, ValueError, "uint8 codes"),
])
def test_bad_pq_embedding(kwargs, error, match):
    with pytest.raises(error, match=match):
        PQEmbedding(**kwargs)


def test_pq_embedding_rejects_out_of_range_ids():
    emb = PQEmbedding(torch.zeros(10, 3, dtype=torch.uint8), 12)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        emb(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"item_ids must lie in \[0, 10\)"):
        emb.score(torch.randn(2, 12), torch.tensor([-1]))
    with pytest.raises(ValueError, match="seq_emb must end in dim=12"):
        emb.topk(torch.randn(2, 8), 3)


def test_views_of_one_codes_tensor_share_their_cache_entry():
    from recjpq._codes_cache import codes_info

    codes = torch.randint(0, 16, (50, 3), dtype=torch.uint8)
    assert codes_info(codes[1:]) is codes_info(codes[1:])  # a fresh view object each time
    assert codes_info(codes[1:]) is not codes_info(codes[2:])
    assert codes_info(codes[1:]).max_code == int(codes[1:].max())
    codes[1:].fill_(3)  # an in-place edit through another view invalidates every entry
    assert codes_info(codes[1:]).max_code == 3
    S = torch.randn(2, 3, 16)
    codes[:, 0] = 40
    with pytest.raises(ValueError, match=r"got values in \[3, 40\]"):
        ops.pq_topk(S, codes[1:], 3)
