"""recjpq.ops against brute force, on every CPU backend, on awkward shapes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import recjpq
from recjpq import ops
from conftest import assert_topk, brute_force_topk, random_problem

# The Triton interpreter is too slow for these shapes; tests/test_triton_backend.py covers it.
BACKENDS = [b for b in recjpq.available_backends("cpu") if b != "triton"]

SHAPES = [  # (B, N, M, K)
    (1, 1, 1, 16),
    (3, 37, 3, 16),
    (2, 1000, 8, 256),
    (5, 4099, 12, 256),
    (2, 777, 3, 1000),
    (1, 2500, 1, 256),
]


def test_subitem_scores_matches_chunked_dot():
    q, c = torch.randn(4, 12), torch.randn(3, 16, 4)
    S = ops.subitem_scores(q, c)
    assert S.shape == (4, 3, 16) and S.dtype == torch.float32
    expected = torch.stack([q[:, m * 4:(m + 1) * 4] @ c[m].T for m in range(3)], dim=1)
    torch.testing.assert_close(S, expected)
    # leading dims are kept
    assert ops.subitem_scores(torch.randn(2, 5, 12), c).shape == (2, 5, 3, 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pq_scores_matches_brute_force(backend, shape):
    batch, n, m, k_codes = shape
    S, codes = random_problem(batch, n, m, k_codes, seed=n)
    got = ops.pq_scores(S, codes, backend=backend)
    idx = codes.long()
    expected = sum(S[:, j, idx[:, j]].double() for j in range(m)).float()
    assert got.shape == (batch, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_pq_topk_matches_brute_force(backend, shape):
    batch, n, m, k_codes = shape
    S, codes = random_problem(batch, n, m, k_codes, seed=n + 1)
    for k in sorted({1, min(7, n), n}):
        values, indices = ops.pq_topk(S, codes, k, backend=backend)
        assert_topk(S, codes, k, values, indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 500, 3, 16), (2, 3001, 8, 256), (2, 129, 12, 1000)])
def test_pq_topk_ties_go_to_lower_index(backend, shape):
    batch, n, m, k_codes = shape
    S, codes = random_problem(batch, n, m, k_codes, seed=7, integer_scores=True)  # many exact ties
    for k in (1, 13, n):
        values, indices = ops.pq_topk(S, codes, k, backend=backend)
        assert_topk(S, codes, k, values, indices, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pq_topk_exclusions(backend):
    S, codes = random_problem(3, 300, 3, 16, seed=3, integer_scores=True)
    _, best = ops.pq_topk(S, codes, 20, backend="reference")
    exclude = torch.full((3, 25), -1, dtype=torch.int64)
    exclude[0, :10] = best[0, :10]  # drop the leaders
    exclude[1, :5] = torch.tensor([0, 0, 299, 150, 150])  # duplicates and the edges
    exclude[2, 3] = best[2, 0]
    values, indices = ops.pq_topk(S, codes, 20, exclude=exclude, backend=backend)
    assert_topk(S, codes, 20, values, indices, exclude, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pq_topk_fewer_items_than_k_after_exclusion(backend):
    S, codes = random_problem(2, 10, 3, 16, seed=5)
    exclude = torch.tensor([list(range(8)), [-1] * 8])
    values, indices = ops.pq_topk(S, codes, 5, exclude=exclude, backend=backend)
    assert indices[0, :2].tolist() == brute_force_topk(S, codes, 2, exclude)[1][0].tolist()
    assert indices[0, 2:].tolist() == [-1, -1, -1]
    assert torch.isinf(values[0, 2:]).all() and (values[0, 2:] < 0).all()
    assert (indices[1] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pq_topk_accepts_wider_code_dtypes(backend):
    S, codes = random_problem(2, 999, 3, 256, seed=9)
    expected = ops.pq_topk(S, codes, 9, backend=backend)
    for dtype in (torch.int16, torch.int32):
        got = ops.pq_topk(S, codes.to(dtype), 9, backend=backend)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(1, 600), m=st.integers(1, 9),
       k_codes=st.sampled_from([2, 16, 256, 300]), k_frac=st.floats(0, 1), ties=st.booleans(),
       n_excl=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_pq_topk_fuzz(batch, n, m, k_codes, k_frac, ties, n_excl, seed):
    S, codes = random_problem(batch, n, m, k_codes, seed=seed, integer_scores=ties)
    k = max(1, round(k_frac * n))
    g = torch.Generator().manual_seed(seed)
    exclude = torch.randint(-1, n, (batch, n_excl), generator=g) if n_excl else None
    for backend in BACKENDS:
        values, indices = ops.pq_topk(S, codes, k, exclude=exclude, backend=backend)
        assert_topk(S, codes, k, values, indices, exclude, exact=ties)


def test_reference_memory_is_chunked(monkeypatch):
    """The reference never builds B x N x M: it scores chunks no wider than its chunk size."""
    from recjpq.backends import reference

    widths = []
    real = reference._chunk_scores
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(reference, "_chunk_scores", lambda S, c: widths.append(c.shape[0]) or real(S, c))
    S, codes = random_problem(4, 10_000, 3, 16)
    values, indices = ops.pq_topk(S, codes, 5, backend="reference")
    assert max(widths) == 1024 and len(widths) == 10  # 10,000 items in chunks of max(k, 1024, 4096 // B)
    assert_topk(S, codes, 5, values, indices)


def test_pq_scores_gradient():
    S, codes = random_problem(3, 200, 3, 16, seed=1)
    S.requires_grad_(True)
    w = torch.randn(3, 200)
    (ops.pq_scores(S, codes) * w).sum().backward()
    S2 = S.detach().clone().requires_grad_(True)
    idx = codes.long()
    (sum(S2[:, m, idx[:, m]] for m in range(3)) * w).sum().backward()
    torch.testing.assert_close(S.grad, S2.grad)


def test_pq_topk_values_gradient():
    S, codes = random_problem(2, 300, 3, 16, seed=2)
    exclude = torch.tensor([[0, 1, 2], [-1, -1, -1]])
    S.requires_grad_(True)
    values, indices = ops.pq_topk(S, codes, 6, exclude=exclude)
    w = torch.randn(2, 6)
    (values * w).sum().backward()
    S2 = S.detach().clone().requires_grad_(True)
    idx = codes.long()
    scores = sum(S2[:, m, idx[:, m]] for m in range(3))
    (scores.gather(1, indices) * w).sum().backward()
    torch.testing.assert_close(S.grad, S2.grad)


def test_gradcheck_pq_scores_float64_input():
    S = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 4, (7, 3), dtype=torch.uint8)
    out = ops.pq_scores(S, codes)
    grad = torch.autograd.grad(out.sum(), S)[0]
    counts = torch.stack([torch.bincount(codes[:, m].long(), minlength=4) for m in range(3)])
    torch.testing.assert_close(grad, counts.expand(2, 3, 4).double())


def test_pq_topk_under_torch_compile():
    S, codes = random_problem(3, 500, 3, 16, seed=4)
    centroids = torch.randn(3, 16, 4)

    def recommend(query):
        return ops.pq_topk(ops.subitem_scores(query, centroids), codes, 5)

    q = torch.randn(3, 12)
    compiled = torch.compile(recommend, fullgraph=True, backend="aot_eager")  # traces the fake impls too
    eager_v, eager_i = recommend(q)
    got_v, got_i = compiled(q)
    assert torch.equal(got_i, eager_i)
    torch.testing.assert_close(got_v, eager_v)


def test_custom_ops_pass_opcheck():
    S, codes = random_problem(2, 50, 3, 16)
    torch.library.opcheck(torch.ops.recjpq.pq_topk.default, (S, codes, 4, None, "reference", "auto"))
    torch.library.opcheck(torch.ops.recjpq.pq_scores.default, (S.requires_grad_(), codes, "reference"))
