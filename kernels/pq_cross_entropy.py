"""Fused PQ log-sum-exp and its gradient: the item-wide half of ``recjpq.ops.pq_cross_entropy``.

Forward: one program per (query group, item range) keeps a running max and sum of exponentials
per query over its range's tiles; the ``[ranges, B]`` partials are merged in PyTorch. Backward:
the same tiles are scored again, and each item's weighted softmax probability is added to
``dS[b, m, codes[i, m]]`` for every split with relaxed atomics. Neither pass holds more than one
``[QB, BLOCK_N]`` tile of scores. Both compute in float32 (``score_tile`` is float32).
"""
import torch
import triton
import triton.language as tl

from recjpq.kernels.pq_lookup import INTERPRETED, score_tile

# Untuned (no GPU was available to measure on); the interpreter gets tiles small enough for tests.
# Not autotuned: the backward kernel accumulates into dS, so a tuning rerun would double count.
_BLOCK_N, _QB, _WARPS = (32, 2, 1) if INTERPRETED else (256, 4, 4)


@triton.jit
def pq_logsumexp_kernel(S, codes_t, run_max, run_sum, B, N, range_len, scale, M: tl.constexpr, K: tl.constexpr,
                        BLOCK_N: tl.constexpr, QB: tl.constexpr):
    rows = tl.program_id(0) * QB + tl.arange(0, QB)
    row_ok = rows < B
    lo = tl.program_id(1) * range_len
    hi = tl.minimum(lo + range_len, N)
    best = tl.full((QB,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((QB,), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        items = start + tl.arange(0, BLOCK_N)
        item_ok = items < hi
        z = score_tile(S, codes_t, rows, row_ok, items, item_ok, N, M, K) * scale
        z = tl.where(item_ok[None, :], z, float("-inf"))
        new_best = tl.maximum(best, tl.max(z, axis=1))
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(z - new_best[:, None]), axis=1)
        best = new_best
    out = tl.program_id(1) * B + rows
    tl.store(run_max + out, best, mask=row_ok)
    tl.store(run_sum + out, total, mask=row_ok)


@triton.jit
def pq_logsumexp_backward_kernel(S, codes_t, lse, weight, dS, B, N, range_len, scale, M: tl.constexpr,
                                 K: tl.constexpr, BLOCK_N: tl.constexpr, QB: tl.constexpr):
    rows = tl.program_id(0) * QB + tl.arange(0, QB)
    row_ok = rows < B
    shift = tl.load(lse + rows, mask=row_ok, other=0.0)
    w = tl.load(weight + rows, mask=row_ok, other=0.0)
    grads = dS + rows.to(tl.int64)[:, None] * (M * K)
    lo = tl.program_id(1) * range_len
    hi = tl.minimum(lo + range_len, N)
    for start in range(lo, hi, BLOCK_N):
        items = start + tl.arange(0, BLOCK_N)
        item_ok = items < hi
        ok = row_ok[:, None] & item_ok[None, :]
        z = score_tile(S, codes_t, rows, row_ok, items, item_ok, N, M, K) * scale
        p = tl.exp(z - shift[:, None]) * w[:, None]
        for m in tl.static_range(M):
            code = tl.load(codes_t + m * N.to(tl.int64) + items, mask=item_ok, other=0).to(tl.int32)
            tl.atomic_add(grads + (m * K + code)[None, :], p, mask=ok, sem="relaxed")


def _launch_shape(batch: int, n: int, ranges: int):
    range_len = triton.cdiv(triton.cdiv(n, ranges), _BLOCK_N) * _BLOCK_N
    return (triton.cdiv(batch, _QB), triton.cdiv(n, range_len)), range_len


def pq_logsumexp(S: torch.Tensor, codes_t: torch.Tensor, scale: float, ranges: int) -> torch.Tensor:
    """``lse[b] = log sum_i exp(scale * score[b, i])`` for S ``[B, M, K]`` and split-major codes ``[M, N]``."""
    batch, m, num_codes = S.shape
    n = codes_t.shape[1]
    grid, range_len = _launch_shape(batch, n, ranges)
    run_max = torch.empty(grid[1], batch, dtype=torch.float32, device=S.device)
    run_sum = torch.empty_like(run_max)
    pq_logsumexp_kernel[grid](S.float(), codes_t, run_max, run_sum, batch, n, range_len, scale, M=m, K=num_codes,
                              BLOCK_N=_BLOCK_N, QB=_QB, num_warps=_WARPS)
    best = run_max.max(dim=0).values
    lse = best + torch.log((run_sum * torch.exp(run_max - best)).sum(dim=0))
    return lse.to(S.dtype)


def pq_logsumexp_backward(S: torch.Tensor, codes_t: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor,
                          scale: float, ranges: int) -> torch.Tensor:
    """The gradient of ``sum_b grad_lse[b] * lse[b]`` with respect to S."""
    batch, m, num_codes = S.shape
    n = codes_t.shape[1]
    grid, range_len = _launch_shape(batch, n, ranges)
    dS = torch.zeros(S.shape, dtype=torch.float32, device=S.device)
    weight = (grad_lse * scale).float().contiguous()
    pq_logsumexp_backward_kernel[grid](S.float(), codes_t, lse.float().contiguous(), weight, dS, batch, n, range_len,
                                       scale, M=m, K=num_codes, BLOCK_N=_BLOCK_N, QB=_QB, num_warps=_WARPS)
    return dS.to(S.dtype)
