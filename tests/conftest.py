"""Shared test helpers: random problems of awkward shapes and the brute-force oracle."""
from __future__ import annotations

import os

import pytest
import torch

# @triton.jit picks compile or interpret when a kernel is decorated (when recjpq.kernels is first
# imported), so the choice is made here, before any test module imports recjpq: without a GPU,
# Triton kernels run in the interpreter on CPU tensors (tests/test_triton_backend.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def random_problem(batch, n, m, k_codes, *, seed=0, integer_scores=False, dtype=None, device="cpu"):
    """S ``[B, M, K]`` and codes ``[N, M]``. ``integer_scores`` makes every sum exact in float32,
    so backends that add splits in different orders must agree bit for bit (and ties are common)."""
    g = torch.Generator().manual_seed(seed)
    if integer_scores:
        S = torch.randint(-3, 4, (batch, m, k_codes), generator=g).float()
    else:
        S = torch.randn(batch, m, k_codes, generator=g)
    if dtype is None:
        dtype = torch.uint8 if k_codes <= 256 else torch.int32
    codes = torch.randint(0, k_codes, (n, m), generator=g).to(dtype)
    return S.to(device), codes.to(device)


def brute_force_topk(S, codes, k, exclude=None):
    """Materialised scores in float64 + a stable sort: the definition the ops must meet."""
    idx = codes.long()
    scores = torch.stack([S[:, m].double()[:, idx[:, m]] for m in range(S.shape[1])]).sum(0)
    if exclude is not None:
        for b in range(S.shape[0]):
            ids = exclude[b][exclude[b] >= 0]
            scores[b, ids] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    values = torch.gather(scores, 1, order)
    order = torch.where(torch.isinf(values), torch.full_like(order, -1), order)
    return values.float(), order


@pytest.fixture
def problem():
    return random_problem


def exact_scores(S, codes, indices):
    """float64 scores of the given item ids ``[B, k]`` (ids of -1 score -inf)."""
    idx = codes.long()[indices.clamp(min=0)]  # [B, k, M]
    picked = torch.gather(S.double(), 2, idx.transpose(1, 2)).sum(1)
    return picked.masked_fill(indices < 0, float("-inf"))


def assert_topk(S, codes, k, values, indices, exclude=None, exact=False):
    """Check a top-k result against brute force. ``exact`` (integer-valued S, so every summation
    order agrees) demands identical values and indices; otherwise values must match within float32
    rounding and each returned item must really have its returned score (near-ties may swap)."""
    ref_values, ref_indices = brute_force_topk(S, codes, k, exclude)
    assert values.shape == ref_values.shape and values.dtype == torch.float32
    assert indices.shape == ref_indices.shape and indices.dtype == torch.int64
    if exact:
        assert torch.equal(values, ref_values), (values, ref_values)
        assert torch.equal(indices, ref_indices), (indices, ref_indices)
        return
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices < 0, ref_indices < 0)
    torch.testing.assert_close(exact_scores(S, codes, indices).float(), values, rtol=1e-5, atol=1e-5)
    for b in range(indices.shape[0]):
        found = indices[b][indices[b] >= 0].tolist()
        assert len(found) == len(set(found)), "an item was returned twice"
        if exclude is not None:
            assert not set(found) & set(exclude[b].tolist()), "an excluded item was returned"
