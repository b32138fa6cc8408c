"""``recjpq.ops.pq_topk_query``: the "lut" route on every backend, and the triton "decode" kernels
(tensor-core scores of decoded items, exact rescoring within a proven margin) against
``pq_topk(subitem_scores(...))`` on the reference backend, bit for bit.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
with 32-item tiles and 16-query blocks, so the shapes here are tiny and still cover partial tiles,
partial query blocks and several item ranges per query. The interpreter's tl.dot is float32, so the
near-tie and overflow cases use ``"decode_bf16"``, whose operands really are rounded.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton", reason="triton is not installed")

import recjpq  # noqa: E402
from recjpq import ops  # noqa: E402
from recjpq.backends import get  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in recjpq.available_backends(DEVICE):
    pytest.skip(f"the triton backend cannot run on {DEVICE}: "
                f"{get('triton').unavailable_reason(torch.device(DEVICE))}", allow_module_level=True)

from recjpq.kernels import pq_decode_topk as decode  # noqa: E402


def _catalogue(batch, n, m, k_codes, dsub, *, seed=0, integer=False, dtype=None):
    """Queries ``[B, M * dsub]``, centroids ``[M, K, dsub]``, codes ``[N, M]``. ``integer`` makes
    every score an exact small integer: float32 sums agree in any order and ties abound."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        query = torch.randint(-2, 3, (batch, m * dsub), generator=g).float()
        centroids = torch.randint(-1, 2, (m, k_codes, dsub), generator=g).float()
    else:
        query, centroids = torch.randn(batch, m * dsub, generator=g), torch.randn(m, k_codes, dsub, generator=g)
    dtype = dtype or (torch.uint8 if k_codes <= 256 else torch.int32)
    codes = torch.randint(0, k_codes, (n, m), generator=g).to(dtype)
    return query.to(DEVICE), centroids.to(DEVICE), codes.to(DEVICE)


def _reference(query, centroids, codes, k, exclude=None):
    return ops.pq_topk(ops.subitem_scores(query, centroids), codes, k, exclude=exclude, backend="reference")


def _assert_same(got, want):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1], want[1])


@pytest.mark.parametrize("batch,n,m,k_codes,dsub,k,dtype", [
    (3, 100, 3, 16, 5, 7, torch.uint8),     # M odd, d/M = 5 (padded to 16), N not a multiple of 32
    (17, 33, 1, 300, 16, 30, torch.int16),  # two query blocks, the second partial; k close to N
    (2, 40, 4, 256, 3, 40, torch.int32),    # k == N
])
def test_decode_matches_reference(batch, n, m, k_codes, dsub, k, dtype):
    query, centroids, codes = _catalogue(batch, n, m, k_codes, dsub, seed=n, dtype=dtype)
    _assert_same(ops.pq_topk_query(query, centroids, codes, k, algorithm="decode"),
                 _reference(query, centroids, codes, k))


def test_decode_exact_ties_and_exclusions():
    query, centroids, codes = _catalogue(4, 40, 3, 4, 6, integer=True, seed=1)
    exclude = torch.tensor([
        [5, -1, 3, 39, 31, 32, 32],        # duplicates, padding, tile edges (32-item tiles interpreted)
        [-1, -1, -1, -1, -1, -1, -1],      # nothing excluded
        [0, 1, 2, 3, 4, 5, 6],
        [39, 38, 37, 36, 35, 34, 33],
    ], device=DEVICE)
    k = 37  # rows 0, 2 and 3 have fewer than k items left: -inf / -1 tail
    got = ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, algorithm="decode_tf32x3")
    _assert_same(got, _reference(query, centroids, codes, k, exclude))
    assert (got[1][0] == -1).sum() == k - (40 - 5)


def _near_ties(batch=2, n=80, m=2, dsub=16, k_codes=64, seed=0):
    """Items whose exact scores differ by less than bf16 rounding: the approximate order is wrong."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, 1, dsub, generator=g)
    centroids = base + 1e-3 * torch.randn(m, k_codes, dsub, generator=g)
    query = torch.randn(batch, m * dsub, generator=g)
    codes = torch.randint(0, k_codes, (n, m), generator=g).to(torch.uint8)
    return query.to(DEVICE), centroids.to(DEVICE), codes.to(DEVICE)


def _bf16_order(query, centroids, codes, k):
    """The top-k of the scores the bf16 kernel approximates (operands rounded to bf16)."""
    items = centroids.bfloat16().double()[torch.arange(codes.shape[1], device=DEVICE), codes.long()].flatten(1)
    return torch.topk(query.bfloat16().double() @ items.T, k, dim=1).indices


def test_decode_near_ties_where_the_approximate_order_is_wrong():
    query, centroids, codes = _near_ties()
    k = 10
    want = _reference(query, centroids, codes, k)
    assert not torch.equal(_bf16_order(query, centroids, codes, k).sort(1).values, want[1].sort(1).values)
    _assert_same(ops.pq_topk_query(query, centroids, codes, k, algorithm="decode_bf16"), want)


def test_margin_bounds_the_bf16_error():
    query, centroids, codes = _near_ties(batch=8, n=2000, seed=3)
    exact = ops.pq_scores(ops.subitem_scores(query, centroids), codes, backend="reference").double()
    items = centroids.bfloat16().double()[torch.arange(codes.shape[1], device=DEVICE), codes.long()].flatten(1)
    error = (query.bfloat16().double() @ items.T - exact).abs().amax(1)
    margin = decode.score_margin(decode.abs_score_bound(query, centroids), centroids, "decode_bf16")
    assert bool((error > 0).all()) and bool((error <= margin).all()), (error, margin)


def test_candidate_overflow_falls_back_to_the_lut_path(monkeypatch):
    from recjpq.backends import triton as triton_backend

    query, centroids, codes = _catalogue(3, 70, 2, 3, 4, integer=True, seed=5)  # many exact ties
    lut_rows = []

    def lut(S, codes_, k, exclude):
        lut_rows.append(S.shape[0])
        return ops.pq_topk(S, codes_, k, exclude=exclude, backend="reference")

    monkeypatch.setattr(decode, "candidate_capacity", lambda k, n: k)
    monkeypatch.setattr(triton_backend, "pq_topk", lut)
    exclude = torch.tensor([[1], [-1], [69]], device=DEVICE)
    got = ops.pq_topk_query(query, centroids, codes, 5, exclude=exclude, algorithm="decode")
    assert lut_rows and lut_rows[0] >= 1
    _assert_same(got, _reference(query, centroids, codes, 5, exclude))


def test_decode_gradients_match_lut():
    query, centroids, codes = _catalogue(2, 40, 2, 16, 4, seed=7)
    grads = []
    for algorithm in ("decode", "lut"):
        q, c = query.clone().requires_grad_(), centroids.clone().requires_grad_()
        values, _ = ops.pq_topk_query(q, c, codes, 5, algorithm=algorithm, backend="triton")
        (values * torch.arange(1.0, 6.0, device=DEVICE)).sum().backward()
        grads.append((q.grad, c.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lut_and_auto_match_reference(backend):
    if backend not in recjpq.available_backends("cpu"):
        pytest.skip(f"the {backend} backend is not available")
    query, centroids, codes = _catalogue(3, 90, 3, 16, 5, seed=2)
    exclude = torch.tensor([[3, -1], [0, 0], [89, 88]], device=DEVICE)
    want = _reference(query.cpu(), centroids.cpu(), codes.cpu(), 9, exclude.cpu())
    for algorithm in ("lut", "auto"):
        got = ops.pq_topk_query(query.cpu(), centroids.cpu(), codes.cpu(), 9, exclude=exclude.cpu(),
                                backend=backend, algorithm=algorithm)
        _assert_same(got, want)


def test_fake_impl_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    query, centroids, codes = _catalogue(3, 50, 2, 16, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        S = torch.empty(3, 2, 16, device=DEVICE)
        values, indices = torch.ops.recjpq.pq_topk_query(S, codes, 7, None, query, centroids, "triton", "decode")
    assert values.shape == (3, 7) and values.dtype == torch.float32
    assert indices.shape == (3, 7) and indices.dtype == torch.int64


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(algorithm="fast"), ValueError, "algorithm must be one of"),
    (dict(algorithm="decode", backend="reference"), ValueError, "only on the triton backend"),
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(query=torch.zeros(12)), ValueError, "query must have 2 dimensions"),
    (dict(query=torch.zeros(2, 12, dtype=torch.int64)), TypeError, "query must have dtype"),
    (dict(query=torch.zeros(2, 10)), ValueError, "not divisible by M=3"),
    (dict(centroids=torch.zeros(2, 16, 6)), ValueError, "centroids have M=2 splits but codes have M=3"),
    (dict(codes=torch.zeros(30, 3, dtype=torch.int64)), TypeError, "codes must have dtype"),
    (dict(codes=torch.full((30, 3), 20, dtype=torch.uint8)), ValueError, "codes"),
    (dict(exclude=torch.zeros(3, 1, dtype=torch.int64)), ValueError, "exclude has 3 rows"),
    (dict(exclude=torch.full((2, 1), 30)), ValueError, "exclude ids must be in"),
])
def test_validation_errors(kwargs, error, match):
    query, centroids, codes = _catalogue(2, 30, 3, 16, 4)
    args = dict(query=query, centroids=centroids, codes=codes, k=3, algorithm="decode")
    args.update({key: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()})
    with pytest.raises(error, match=match):
        ops.pq_topk_query(args.pop("query"), args.pop("centroids"), args.pop("codes"), args.pop("k"), **args)


@settings(max_examples=3, deadline=None)
@given(batch=st.integers(1, 17), n=st.integers(1, 48), m=st.integers(1, 3), dsub=st.integers(1, 17),
       k_frac=st.floats(0, 1), n_excl=st.integers(0, 4), seed=st.integers(0, 1000))
def test_decode_fuzz(batch, n, m, dsub, k_frac, n_excl, seed):
    k = max(1, min(n, int(k_frac * 12)))
    query, centroids, codes = _catalogue(batch, n, m, 16, dsub, seed=seed, integer=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed)
    exclude = torch.randint(-1, n, (batch, n_excl), generator=g).to(DEVICE) if n_excl else None
    algorithm = ("decode", "decode_tf32x3", "decode_bf16")[seed % 3]
    _assert_same(ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, algorithm=algorithm),
                 _reference(query, centroids, codes, k, exclude))
