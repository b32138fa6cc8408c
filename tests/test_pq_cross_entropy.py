"""``recjpq.ops.pq_cross_entropy`` against the materialised loss: ``F.cross_entropy`` over the
``[B, N]`` logits of ``pq_scores``, on every backend that can run here (the Triton kernels in the
interpreter on tiny shapes when there is no GPU; tests/conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

import recjpq
from recjpq import ops
from recjpq.backends import get
from recjpq.nn import PQEmbedding
from conftest import random_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend_param(name):
    reason = None
    if name not in recjpq.available_backends(DEVICE):
        reason = f"the {name} backend cannot run on {DEVICE} here"
    elif not hasattr(get(name), "pq_cross_entropy_forward"):
        reason = f"the {name} backend does not implement pq_cross_entropy"
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


BACKENDS = [_backend_param(name) for name in ("reference", "cpu", "triton")]
FLOAT64_BACKENDS = [_backend_param(name) for name in ("reference", "cpu")]  # Triton computes in float32
INTERPRETED = DEVICE == "cpu"  # the Triton interpreter is slow: keep its problems tiny


def materialised(S, codes, targets, *, temperature=1.0, **kwargs):
    """The definition: materialised B x N logits (gathered in S's own dtype), then ``F.cross_entropy``."""
    idx = codes.long()
    logits = sum(S[:, m, idx[:, m]] for m in range(S.shape[1]))
    return F.cross_entropy(logits / temperature, targets, **kwargs)


def _problem(batch, n, m, k_codes, *, ignored=(), seed=0, dtype=None, float64=False):
    S, codes = random_problem(batch, n, m, k_codes, seed=seed, dtype=dtype, device=DEVICE)
    if float64:
        S = S.double()
    g = torch.Generator().manual_seed(seed + 1)
    targets = torch.randint(0, n, (batch,), generator=g)
    targets[list(ignored)] = -100
    return S.requires_grad_(), codes, targets.to(DEVICE)


def _loss_and_grad(fn, S):
    loss = fn(S)
    # "none" losses get random weights so every row's gradient is checked with its own scale
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).view(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), S)
    return loss.detach(), grad


def assert_matches_materialised(S, codes, targets, backend, **kwargs):
    got = _loss_and_grad(lambda s: ops.pq_cross_entropy(s, codes, targets, backend=backend, **kwargs), S)
    # the definition evaluated in float64: float32 logits summed over hundreds of items carry more
    # rounding than the bounds below, and the fused op (double accumulators) should meet them
    exact = S.detach().double().requires_grad_()
    want = tuple(t.to(S.dtype) for t in _loss_and_grad(lambda s: materialised(s, codes, targets, **kwargs), exact))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    # a gradient entry is a difference of terms up to (row weight <= 1.5) / temperature (probability
    # mass minus the target's 1), so entries that cancel to ~0 are held to float32 rounding of those
    term = 1.5 / kwargs.get("temperature", 1.0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6 * term)


CASES = [  # (B, N, M, K, codes dtype, ignored rows, kwargs)
    ((3, 257, 3, 16, torch.uint8, (), {})),
    ((5, 130, 1, 256, torch.uint8, (0, 3), {"reduction": "sum"})),
    ((4, 301, 5, 300, torch.int16, (1,), {"reduction": "none", "label_smoothing": 0.1})),
    ((2, 97, 7, 33, torch.int32, (), {"temperature": 0.3, "label_smoothing": 0.25})),
]
LARGE_CASES = [  # many tiles and several row blocks (compiled backends only)
    ((19, 5003, 8, 256, torch.uint8, (0, 7, 18), {"label_smoothing": 0.1, "temperature": 0.7})),
    ((1, 9001, 3, 64, torch.int32, (), {"reduction": "sum"})),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES + LARGE_CASES)
def test_loss_and_grad_match_materialised(backend, case):
    (batch, n, m, k_codes, dtype, ignored, kwargs) = case
    if backend == "triton" and INTERPRETED and n > 1000:
        pytest.skip("too large for the Triton interpreter")
    S, codes, targets = _problem(batch, n, m, k_codes, ignored=ignored, dtype=dtype, seed=n)
    assert_matches_materialised(S, codes, targets, backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_cost_nothing_and_all_ignored_means_nan(backend):
    S, codes, targets = _problem(3, 50, 2, 8, ignored=(0, 1, 2))
    for reduction, expected in (("sum", 0.0), ("none", torch.zeros(3))):
        loss = ops.pq_cross_entropy(S, codes, targets, reduction=reduction, backend=backend)
        torch.testing.assert_close(loss, torch.as_tensor(expected, device=DEVICE))
        (grad,) = torch.autograd.grad(loss.sum(), S)
        assert torch.equal(grad, torch.zeros_like(grad))
    mean = ops.pq_cross_entropy(S, codes, targets, backend=backend)
    assert torch.isnan(mean) and torch.isnan(materialised(S, codes, targets))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_targets(backend):
    S, codes, targets = _problem(4, 60, 3, 8)
    targets[2] = 7
    assert_matches_materialised(S, codes, targets.int().long(), backend, ignore_index=7)
    got = ops.pq_cross_entropy(S, codes, targets.int(), ignore_index=7, backend=backend)
    torch.testing.assert_close(got, materialised(S, codes, targets, ignore_index=7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_float64(backend):
    S, codes, targets = _problem(3, 23, 3, 5, ignored=(1,), float64=True)
    assert torch.autograd.gradcheck(
        lambda s: ops.pq_cross_entropy(s, codes, targets, reduction="none", label_smoothing=0.2,
                                       temperature=0.8, backend=backend), (S,))
    assert torch.autograd.gradcheck(lambda s: ops.pq_cross_entropy(s, codes, targets, backend=backend), (S,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_sequence_and_subitem_embeddings(backend):
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (211, 4), dtype=torch.uint8)
    emb = PQEmbedding(codes, dim=8, num_codes=16).to(DEVICE)
    seq = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    targets = torch.tensor([3, -100, 210, 0, 17, 17], device=DEVICE)
    params = (seq, emb.subitem_embeddings)
    fused = torch.autograd.grad(ops.pq_cross_entropy(emb.subitem_scores(seq), emb.codes, targets, backend=backend),
                                params)
    dense = torch.autograd.grad(F.cross_entropy(seq @ emb.weight.T, targets), params)
    for got, want in zip(fused, dense):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    S, codes, targets = _problem(4, 70, 3, 8, ignored=(2,))

    def loss_fn(s):
        return ops.pq_cross_entropy(s, codes, targets, label_smoothing=0.1, backend=backend)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)  # traces the backward graph too
    got, want = _loss_and_grad(compiled, S), _loss_and_grad(loss_fn, S)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_torch_compile_inductor_trains():
    S, codes, targets = _problem(4, 70, 3, 8, ignored=(2,))
    S = S.detach()
    query = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    proj = torch.randn(6, 3 * 8, device=DEVICE)

    def loss_fn(q):
        return ops.pq_cross_entropy((q @ proj).view(4, 3, 8) + S, codes, targets)

    compiled = torch.compile(loss_fn)
    got = torch.autograd.grad(compiled(query), query)[0]
    torch.testing.assert_close(got, torch.autograd.grad(loss_fn(query), query)[0], rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), n=st.integers(1, 300), m=st.integers(1, 5), k_codes=st.integers(1, 40),
       n_ignored=st.integers(0, 2), smoothing=st.sampled_from([0.0, 0.3]), temperature=st.sampled_from([1.0, 0.5]),
       seed=st.integers(0, 1000))
# one sub-id shared by every item: its gradient is exactly 0, the sum of 277 probabilities minus 1
@example(batch=1, n=277, m=1, k_codes=1, n_ignored=0, smoothing=0.0, temperature=1.0, seed=0)
def test_fuzz_against_materialised(batch, n, m, k_codes, n_ignored, smoothing, temperature, seed):
    S, codes, targets = _problem(batch, n, m, k_codes, ignored=range(min(n_ignored, batch)), seed=seed)
    kwargs = {"label_smoothing": smoothing, "temperature": temperature, "reduction": "sum"}
    for backend in recjpq.available_backends(DEVICE):
        if hasattr(get(backend), "pq_cross_entropy_forward") and not (backend == "triton" and INTERPRETED):
            assert_matches_materialised(S, codes, targets, backend, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"targets": torch.tensor([0, 50])}, ValueError, "targets must be in"),
    ({"targets": torch.tensor([0, -2])}, ValueError, "targets must be in"),
    ({"targets": torch.tensor([0.0, 1.0])}, TypeError, "targets must have dtype"),
    ({"targets": torch.tensor([0, 1, 2])}, ValueError, "targets has 3 rows"),
    ({"targets": torch.tensor([[0, 1]])}, ValueError, "targets must have 1 dimensions"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    ({"temperature": 0.0}, ValueError, "temperature must be"),
    ({"temperature": float("inf")}, ValueError, "temperature must be"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
    ({"backend": "nope"}, ValueError, "backend must be one of"),
])
def test_invalid_arguments_raise(kwargs, error, match):
    S, codes = random_problem(2, 50, 3, 8)
    args = {"targets": torch.tensor([0, 1]), **kwargs}
    with pytest.raises(error, match=match):
        ops.pq_cross_entropy(S, codes, **args)


def test_out_of_range_codes_and_nonfinite_scores_raise():
    S, codes = random_problem(2, 50, 3, 8)
    with pytest.raises(ValueError, match="codes must lie in"):
        ops.pq_cross_entropy(S[:, :, :4], codes, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        ops.pq_cross_entropy(S.masked_fill(S > 1, float("nan")), codes, torch.tensor([0, 1]))
