"""Shared test helpers: random problems of awkward shapes and the brute-force oracle."""
from __future__ import annotations

import pytest
import torch


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
