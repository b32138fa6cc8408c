"""Top-k by decoding items and ``tl.dot`` with a block of queries, then exact rescoring.

For large batches the LUT kernel (``pq_topk.py``) does B x N x M gathers; decoding a tile of item
embeddings from the sub-item embeddings (one gathered centroid row per split) and multiplying it
with a block of queries on the tensor cores does the same work as the dense GEMM, with no
``[N, d]`` item table and no B x N scores. Tensor-core scores are approximate, so:

1. ``decode_threshold_kernel``: each (item range, query block) program keeps its best ``KT``
   approximate keys (exclusions applied); the k-th best of their union is ``T_b``.
2. ``decode_candidates_kernel``: every item with ``approx >= T_b - 2 * margin_b`` is appended to
   its query's candidate list (``margin_b`` bounds ``|approx - exact|``, see ``score_margin``);
   nothing is written past ``capacity``.
3. Excluded candidates are dropped (a binary search in the sorted exclusions: in pass 2 the
   exclusion test spilled registers), the rest are rescored exactly from S in split order
   (bit-identical to the reference) and selected with the packed keys of ``recjpq.topk_keys``.
   Queries whose list overflowed, or whose scores could overflow float32, take the LUT path.

docs/triton-kernels.md ("pq_topk_query: decode + tl.dot") proves that no exact top-k item, ties included, can
be missing from the candidates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from recjpq.kernels.pq_lookup import (INTERPRETED, MAX_REGISTERS, empty_key, load_codes, merge_tile, program_items,
                                     store_best, tile_items)
from recjpq.kernels.pq_topk import key_slots, tile_size
from recjpq.topk_keys import EMPTY_KEY, pack_keys as pack_keys_torch, unpack_keys

# algorithm -> (operand dtype, tl.dot input_precision, eta, fp32 additions per product).
# eta bounds the relative error of one product |q~ c~ - q c| / |q c| (q~, c~: the operands the
# tensor cores see; their products are exact in fp32): bf16 rounds to nearest in PyTorch (2e + e^2,
# e = 2^-8); tf32 may truncate in hardware (e = 2^-10); tf32x3 drops the lo*lo product and rounds
# the lo parts (e^2 (3 + 2e) <= 2^-18) and adds three products per pair.
DECODE_ALGORITHMS = {
    "decode": (torch.float32, "tf32", 2.0**-9 + 2.0**-20, 1),
    "decode_tf32x3": (torch.float32, "tf32x3", 2.0**-18, 3),
    "decode_bf16": (torch.bfloat16, "ieee", 2.0**-7 + 2.0**-16, 1),
}
# Relative error of one float32 addition, 4x round-to-nearest's 2^-24: tensor cores are not
# documented to round their accumulations to nearest.
_ADD_ERROR = 2.0**-22
# Past this, a program's keys would not fit in registers next to the dot tiles (see _prune).
MAX_DECODE_K = 128
# With exclusions the threshold pass's search adds registers: at KT = 128 it spilled on sm_80
# (compile matrix), so such calls with k > 16 take the LUT path.
MAX_DECODE_K_EXCLUDING = 16
# Queries whose ``abs_score_bound`` reaches this take the LUT path, so no partial sum can overflow.
_SAFE_BOUND = 2.0**100
# The interpreter's tl.dot misreads bf16 operands; their values are exact in float32.
_UPCAST_OPERANDS = tl.constexpr(INTERPRETED)

# Compiled for sm_90 (Triton 3.9, no GPU), these use at most 254 registers per thread and no
# local memory at M = 32, d/M = 16; wider tiles per thread spill. Untimed.
_THRESHOLD_CONFIGS = [triton.Config({"BLOCK_N": 32, "BQ": 16})] if INTERPRETED else [
    triton.Config({"BLOCK_N": 64, "BQ": 64}, num_warps=8, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 64, "BQ": 32}, num_warps=4, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 128, "BQ": 32}, num_warps=8, maxnreg=MAX_REGISTERS),
]
# The threshold pass with exclusions (the search adds registers; KT <= 16, MAX_DECODE_K_EXCLUDING):
# the compile matrix showed the configs above spilling with exclusions, this one not.
_EXCLUDE_CONFIGS = [] if INTERPRETED else [
    triton.Config({"BLOCK_N": 32, "BQ": 32}, num_warps=4, maxnreg=MAX_REGISTERS),
]
_CANDIDATE_CONFIGS = [triton.Config({"BLOCK_N": 32, "BQ": 16})] if INTERPRETED else [
    triton.Config({"BLOCK_N": 64, "BQ": 64}, num_warps=4, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 128, "BQ": 64}, num_warps=8, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 64, "BQ": 128}, num_warps=8, maxnreg=MAX_REGISTERS),
]


@triton.constexpr_function
def padded_dsub(dsub):
    """``tl.dot`` needs power-of-two inner sizes of at least 16; the padding is masked to zero."""
    return max(16, triton.next_power_of_2(dsub))


def _prune(configs, named_args, **kwargs):
    """Drop query blocks much wider than the batch; in the threshold pass, keep the configs for
    the exclusion setting (``_EXCLUDE_CONFIGS`` at 4-8 int64 keys per thread with exclusions,
    the others at most 16 without): more spilled (kernels/compile_check.py)."""
    args = {**named_args, **kwargs}
    batch, kt = args["B_BUCKET"], args.get("KT")
    if kt is None:
        return [c for c in configs if c.kwargs["BQ"] <= max(batch, 32)] or configs[:1]
    per_thread = lambda c: c.kwargs["BQ"] * tile_size(c.kwargs["BLOCK_N"], kt) / (32 * c.num_warps)
    if args.get("EXCLUDE_STEPS", 0) > 0 and _EXCLUDE_CONFIGS:
        pool = [c for c in configs if c in _EXCLUDE_CONFIGS]
        fits = [c for c in pool if 4 <= per_thread(c) <= 8]
    else:
        pool = [c for c in configs if c not in _EXCLUDE_CONFIGS]
        fits = [c for c in pool if per_thread(c) <= 16]
    kept = [c for c in fits if c.kwargs["BQ"] <= max(batch, 32)]
    return kept or fits[:1] or [min(pool, key=per_thread)]


@triton.jit
def approx_tile(query, centroids, codes_t, stride, rows, row_ok, items, item_ok, K, M: tl.constexpr,
                DSUB: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``[BQ, TILE]`` tensor-core scores: each split's centroid rows, gathered by code, are one
    ``[DSUB, TILE]`` operand of a ``tl.dot`` with the queries' matching ``[BQ, DSUB]`` chunk."""
    DP: tl.constexpr = padded_dsub(DSUB)
    j = tl.arange(0, DP)
    j_ok = j < DSUB
    q_rows = query + rows.to(tl.int64)[:, None] * (M * DSUB)
    acc = tl.zeros((rows.shape[0], items.shape[0]), dtype=tl.float32)
    for m in range(M):  # not unrolled: unrolled, the splits' gathers are hoisted and spill registers
        code = load_codes(codes_t, stride, m, items)
        q = tl.load(q_rows + m * DSUB + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        c = tl.load(centroids + (m * K + code)[None, :] * DSUB + j[:, None],
                    mask=j_ok[:, None] & item_ok[None, :], other=0.0)
        if _UPCAST_OPERANDS:
            q, c = q.to(tl.float32), c.to(tl.float32)
        acc = tl.dot(q, c, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(configs=_THRESHOLD_CONFIGS + _EXCLUDE_CONFIGS,
                 key=["M", "DSUB", "B_BUCKET", "KT", "EXCLUDE_STEPS", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["B", "N", "K", "E", "num_splits", "B_BUCKET"])
def decode_threshold_kernel(query, centroids, codes_t, stride, exclude_sorted, cand, B, N, K, E, num_splits, B_BUCKET,
                            M: tl.constexpr, DSUB: tl.constexpr, KT: tl.constexpr, EXCLUDE_STEPS: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BQ: tl.constexpr):
    """Pass 1: a running top-``KT`` of approximate keys per (item range, query block), as in
    ``pq_topk_kernel``, written to ``cand[B, num_splits, KT]``."""
    TILE: tl.constexpr = tile_size(BLOCK_N, KT)
    split, rows, row_ok, first, last = program_items(B, N, num_splits, TILE, BQ)
    best = tl.full((BQ, KT), empty_key(), tl.int64)  # descending
    for tile in range(first, last):
        start, items, item_ok = tile_items(tile, TILE, N)
        scores = approx_tile(query, centroids, codes_t, stride, rows, row_ok, items, item_ok, K, M, DSUB,
                             INPUT_PRECISION)
        best = merge_tile(best, scores, rows, row_ok, start, items, item_ok, exclude_sorted, E, KT, EXCLUDE_STEPS)
    store_best(cand, best, rows, row_ok, split, num_splits, KT)


@triton.autotune(configs=_CANDIDATE_CONFIGS, key=["M", "DSUB", "B_BUCKET", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["counts"])
@triton.jit(do_not_specialize=["B", "N", "K", "capacity", "B_BUCKET"])
def decode_candidates_kernel(query, centroids, codes_t, stride, threshold, cand_ids, counts, B, N, K, capacity,
                             B_BUCKET,
                             M: tl.constexpr, DSUB: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                             BLOCK_N: tl.constexpr, BQ: tl.constexpr):
    """Pass 2: one program per (item tile, query block), query blocks fastest so they share the
    tile's codes and centroid rows in L2. Appends the items scoring ``>= threshold[b]`` to
    ``cand_ids[b]``; ``counts[b]`` counts all of them, so ``counts > capacity`` flags an overflow."""
    pid = tl.program_id(0)
    groups = tl.cdiv(B, BQ)
    rows = (pid % groups) * BQ + tl.arange(0, BQ)
    row_ok = rows < B
    start = (pid // groups) * BLOCK_N
    items = start + tl.arange(0, BLOCK_N)
    item_ok = items < N
    scores = approx_tile(query, centroids, codes_t, stride, rows, row_ok, items, item_ok, K, M, DSUB, INPUT_PRECISION)
    thr = tl.load(threshold + rows, mask=row_ok, other=float("inf"))
    keep = row_ok[:, None] & item_ok[None, :] & (scores >= thr[:, None])
    keep_i = keep.to(tl.int32)
    found = tl.sum(keep_i, axis=1)
    if tl.max(found) > 0:
        base = tl.atomic_add(counts + rows, found, mask=row_ok & (found > 0), sem="relaxed")
        slot = base[:, None] + tl.cumsum(keep_i, axis=1) - 1
        dest = cand_ids + rows.to(tl.int64)[:, None] * capacity + slot
        tl.store(dest, tl.broadcast_to(items[None, :], slot.shape), mask=keep & (slot < capacity))


def _matmul_eta(device: torch.device) -> float:
    """Per-product relative error of ``subitem_scores``'s float32 einsum under torch's matmul
    precision setting (its S is the exact score's source, so the margin must cover it)."""
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return DECODE_ALGORITHMS["decode_bf16"][2]
    if precision == "high" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        return DECODE_ALGORITHMS["decode"][2]
    return 0.0


def abs_score_bound(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: ``A_b = sum_j |q_bj| * max_k |centroids[m(j), k, j]|``, at least
    ``sum_j |q_bj * item_i[j]|`` for every item i."""
    return query.double().abs() @ centroids.double().abs().amax(dim=1).reshape(-1)


def score_margin(bound: torch.Tensor, centroids: torch.Tensor, algorithm: str) -> torch.Tensor:
    """float64 ``[B]`` upper bounds on ``|approx - exact|`` over every item, for each query.

    Relative to ``bound`` (``abs_score_bound``), products on the tensor cores err by ``eta``,
    S's einsum by ``eta_S``, and each float32 addition (the dot's ``adds * d``, S's ``d / M``, the
    split sum's ``M``, 3 casts) by at most ``_ADD_ERROR``, to first order; 2% covers the rest.
    """
    _, eta, adds = DECODE_ALGORITHMS[algorithm][1:]
    m, _, dsub = centroids.shape
    rel = eta + _matmul_eta(centroids.device) + (adds * m * dsub + dsub + m + 3) * _ADD_ERROR
    return 1.02 * rel * bound


def candidate_capacity(k: int, n: int) -> int:
    """Candidate slots per query: the top-k plus room for the items within the margin (Gaussian
    scores, d = 512, N = 1e7, k = 100: about 280 with tf32, 3,800 with bf16)."""
    return min(n, max(8192, 32 * triton.next_power_of_2(k)))


def _exact_scores(S: torch.Tensor, codes_t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` scores of per-query item ids, splits added in order as the reference does."""
    scores = S[:, 0].gather(1, codes_t[0][ids].long())
    for m in range(1, S.shape[1]):
        scores += S[:, m].gather(1, codes_t[m][ids].long())
    return scores


def _excluded(exclude_sorted: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: is ``ids[b, c]`` in row b of the ascending ``exclude_sorted``?"""
    pos = torch.searchsorted(exclude_sorted, ids).clamp(max=exclude_sorted.shape[1] - 1)
    return exclude_sorted.gather(1, pos) == ids


def _round_down(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 not above it (-inf stays)."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, y.new_tensor(float("-inf"))), y)


def _bucket(batch: int) -> int:
    return min(triton.next_power_of_2(batch), 1024)


def pq_decode_topk(query, centroids, S, codes_t, n, k, exclude, num_splits, algorithm, lut):
    """Exact top-k (``recjpq.ops.pq_topk_query``'s semantics) by the passes in the module docstring.

    ``query [B, d]``, ``centroids [M, K, d/M]``, ``S = subitem_scores(query, centroids)`` float32,
    ``codes_t`` the padded split-major ``[M, stride]`` codes of ``n`` items, ``exclude`` int64
    ``[B, E]`` or None, k <= N and ``k <= MAX_DECODE_K``. ``lut(S_rows, exclude_rows)`` answers the
    queries that fall back.
    """
    dtype, precision = DECODE_ALGORITHMS[algorithm][:2]
    batch, d = query.shape
    m, num_codes, dsub = centroids.shape
    kt = key_slots(k)
    q = query.to(dtype).contiguous()
    c = centroids.to(dtype).contiguous()
    if exclude is not None and exclude.shape[1] > 0:
        exclude_sorted, width = torch.sort(exclude, dim=1).values, exclude.shape[1]
    else:
        exclude_sorted, width = codes_t, 0  # never read: EXCLUDE_STEPS = 0 compiles the lookup out
    shape = dict(M=m, DSUB=dsub, INPUT_PRECISION=precision)

    cand = torch.empty(batch, num_splits, kt, dtype=torch.int64, device=S.device)
    grid = lambda meta: (num_splits * triton.cdiv(batch, meta["BQ"]),)
    decode_threshold_kernel[grid](q, c, codes_t, codes_t.stride(0), exclude_sorted, cand, batch, n, num_codes, width,
                                  num_splits, _bucket(batch), KT=kt, EXCLUDE_STEPS=width.bit_length(), **shape)
    kth, _ = unpack_keys(torch.topk(cand.view(batch, -1), k, dim=1).values[:, -1])
    bound = abs_score_bound(query, centroids)
    margin = score_margin(bound, centroids, algorithm)
    threshold = _round_down(kth.double() - 2 * margin)

    capacity = candidate_capacity(k, n)
    cand_ids = torch.empty(batch, capacity, dtype=torch.int32, device=S.device)
    counts = torch.zeros(batch, dtype=torch.int32, device=S.device)
    grid = lambda meta: (triton.cdiv(batch, meta["BQ"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    decode_candidates_kernel[grid](q, c, codes_t, codes_t.stride(0), threshold, cand_ids, counts, batch, n, num_codes,
                                   capacity, _bucket(batch), **shape)

    used = min(capacity, max(k, int(counts.max())))  # rescore the filled slots only
    slots = torch.arange(used, device=S.device) < counts.clamp(max=used).unsqueeze(1)
    ids = torch.where(slots, cand_ids[:, :used].long(), 0)
    if width > 0:
        slots &= ~_excluded(exclude_sorted, ids)
    keys = pack_keys_torch(_exact_scores(S, codes_t, ids), ids).masked_fill(~slots, EMPTY_KEY)
    values, indices = unpack_keys(torch.topk(keys, k, dim=1).values)

    fallback = ((counts > capacity) | (bound >= _SAFE_BOUND)).nonzero().squeeze(1)
    if fallback.numel():
        rows_exclude = None if exclude is None else exclude[fallback]
        values[fallback], indices[fallback] = lut(S[fallback], rows_exclude)
    return values, indices
