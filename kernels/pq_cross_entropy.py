"""Fused PQ log-sum-exp and its gradient: the item-wide half of ``recjpq.ops.pq_cross_entropy``.

Forward: one program per (query group, item range) keeps a running max and sum of exponentials
per query over its range's tiles; the ``[ranges, B]`` partials are merged in PyTorch. Backward:
the same tiles are scored again, and each item's weighted softmax probability is added to
``dS[b, m, codes[i, m]]`` for every split with relaxed atomics. Neither pass holds more than one
``[QB, BLOCK_N]`` tile of scores. Both compute in float32 (``score_tile`` is float32).

Float atomics add in whatever order the hardware serves them, so the backward above is not
bitwise reproducible. Under ``torch.use_deterministic_algorithms(True)`` the backward instead
gives each program a private ``[QB, M, K]`` slice of a ``[ranges, B, M, K]`` buffer, adds each
tile's probabilities into it with a one-hot reduction (a fixed tree, no atomics) in tile order,
and sums the slices over ranges with ``torch.sum``: the same bits on every run, at the price of
``K`` compares per item and split.
"""
import torch
import triton
import triton.language as tl

from recjpq.kernels.pq_lookup import INTERPRETED, load_codes, score_tile

# Untuned (no GPU was available to measure on); the interpreter gets tiles small enough for tests.
# Not autotuned: the backward kernel accumulates into dS, so a tuning rerun would double count.
_BLOCK_N, _QB, _WARPS = (32, 2, 1) if INTERPRETED else (256, 4, 4)
# The deterministic backward's tile: a [QB, BLOCK_N, K_BLOCK] one-hot reduction per split and
# code block, 32 values per thread at 4 warps; at most this many ranges (its buffer is
# ranges x the size of dS).
_DET_BLOCK_N, _DET_QB, _DET_K_BLOCK, _DET_WARPS = (16, 2, 16, 1) if INTERPRETED else (64, 2, 32, 4)
_DET_MAX_RANGES = 16


@triton.jit(do_not_specialize=["B", "N", "range_len"])
def pq_logsumexp_kernel(S, codes_t, stride, run_max, run_sum, B, N, range_len, scale, M: tl.constexpr, K: tl.constexpr,
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
        z = score_tile(S, codes_t, stride, rows, row_ok, items, item_ok, M, K) * scale
        z = tl.where(item_ok[None, :], z, float("-inf"))
        new_best = tl.maximum(best, tl.max(z, axis=1))
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(z - new_best[:, None]), axis=1)
        best = new_best
    out = tl.program_id(1) * B + rows
    tl.store(run_max + out, best, mask=row_ok)
    tl.store(run_sum + out, total, mask=row_ok)


@triton.jit
def item_probabilities(S, codes_t, stride, rows, row_ok, shift, w, items, item_ok, scale, M: tl.constexpr,
                       K: tl.constexpr):
    """``[QB, BLOCK_N]`` weighted softmax probabilities ``w * exp(scale * score - lse)``; 0 off range."""
    z = score_tile(S, codes_t, stride, rows, row_ok, items, item_ok, M, K) * scale
    p = tl.exp(z - shift[:, None]) * w[:, None]
    return tl.where(row_ok[:, None] & item_ok[None, :], p, 0.0)


@triton.jit(do_not_specialize=["B", "N", "range_len"])
def pq_logsumexp_backward_kernel(S, codes_t, stride, lse, weight, dS, B, N, range_len, scale, M: tl.constexpr,
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
        p = item_probabilities(S, codes_t, stride, rows, row_ok, shift, w, items, item_ok, scale, M, K)
        for m in tl.static_range(M):
            code = load_codes(codes_t, stride, m, items)
            tl.atomic_add(grads + (m * K + code)[None, :], p, mask=ok, sem="relaxed")


@triton.jit(do_not_specialize=["B", "N", "range_len"])
def pq_logsumexp_backward_partial_kernel(S, codes_t, stride, lse, weight, partial, B, N, range_len, scale,
                                         M: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, QB: tl.constexpr,
                                         K_BLOCK: tl.constexpr):
    """The deterministic backward: this program's range adds into ``partial[range, rows]`` only,
    tile after tile, each tile's contribution a one-hot sum over its items (no atomics)."""
    rows = tl.program_id(0) * QB + tl.arange(0, QB)
    row_ok = rows < B
    shift = tl.load(lse + rows, mask=row_ok, other=0.0)
    w = tl.load(weight + rows, mask=row_ok, other=0.0)
    own = partial + (tl.program_id(1).to(tl.int64) * B + rows.to(tl.int64))[:, None] * (M * K)
    lo = tl.program_id(1) * range_len
    hi = tl.minimum(lo + range_len, N)
    for start in range(lo, hi, BLOCK_N):
        items = start + tl.arange(0, BLOCK_N)
        item_ok = items < hi
        p = item_probabilities(S, codes_t, stride, rows, row_ok, shift, w, items, item_ok, scale, M, K)
        for m in range(M):
            code = load_codes(codes_t, stride, m, items)
            for k0 in range(0, K, K_BLOCK):
                slots = k0 + tl.arange(0, K_BLOCK)
                hit = code[:, None] == slots[None, :]  # [BLOCK_N, K_BLOCK]
                add = tl.sum(tl.where(hit[None, :, :], p[:, :, None], 0.0), axis=1)  # [QB, K_BLOCK]
                dest = own + m * K + slots[None, :]
                ok = row_ok[:, None] & (slots < K)[None, :]
                tl.store(dest, tl.load(dest, mask=ok, other=0.0) + add, mask=ok)


def _launch_shape(batch: int, n: int, ranges: int, block_n: int = _BLOCK_N, qb: int = _QB):
    range_len = triton.cdiv(triton.cdiv(n, ranges), block_n) * block_n
    return (triton.cdiv(batch, qb), triton.cdiv(n, range_len)), range_len


def pq_logsumexp(S: torch.Tensor, codes_t: torch.Tensor, n: int, scale: float, ranges: int) -> torch.Tensor:
    """``lse[b] = log sum_i exp(scale * score[b, i])`` for S ``[B, M, K]`` and the padded
    split-major codes ``[M, stride]`` of ``n`` items."""
    batch, m, num_codes = S.shape
    grid, range_len = _launch_shape(batch, n, ranges)
    run_max = torch.empty(grid[1], batch, dtype=torch.float32, device=S.device)
    run_sum = torch.empty_like(run_max)
    pq_logsumexp_kernel[grid](S.float().contiguous(), codes_t, codes_t.stride(0), run_max, run_sum, batch, n, range_len,
                              scale, M=m, K=num_codes, BLOCK_N=_BLOCK_N, QB=_QB, num_warps=_WARPS)
    best = run_max.max(dim=0).values
    lse = best + torch.log((run_sum * torch.exp(run_max - best)).sum(dim=0))
    return lse.to(S.dtype)


def pq_logsumexp_backward(S: torch.Tensor, codes_t: torch.Tensor, n: int, lse: torch.Tensor,
                          grad_lse: torch.Tensor, scale: float, ranges: int,
                          deterministic: bool = False) -> torch.Tensor:
    """The gradient of ``sum_b grad_lse[b] * lse[b]`` with respect to S (bitwise reproducible
    with ``deterministic``; see the module docstring)."""
    batch, m, num_codes = S.shape
    weight = (grad_lse * scale).float().contiguous()
    args = (S.float().contiguous(), codes_t, codes_t.stride(0), lse.float().contiguous(), weight)
    if deterministic:
        grid, range_len = _launch_shape(batch, n, min(ranges, _DET_MAX_RANGES), _DET_BLOCK_N, _DET_QB)
        partial = torch.zeros((grid[1],) + tuple(S.shape), dtype=torch.float32, device=S.device)
        pq_logsumexp_backward_partial_kernel[grid](*args, partial, batch, n, range_len, scale, M=m, K=num_codes,
                                                   BLOCK_N=_DET_BLOCK_N, QB=_DET_QB, K_BLOCK=_DET_K_BLOCK,
                                                   num_warps=_DET_WARPS)
        return partial.sum(dim=0).to(S.dtype)
    grid, range_len = _launch_shape(batch, n, ranges)
    dS = torch.zeros(S.shape, dtype=torch.float32, device=S.device)
    pq_logsumexp_backward_kernel[grid](*args, dS, batch, n, range_len, scale, M=m, K=num_codes, BLOCK_N=_BLOCK_N,
                                       QB=_QB, num_warps=_WARPS)
    return dS.to(S.dtype)
