"""Fused ``pq_topk``, stage 1: scores item tiles and keeps each query's best ``KT`` packed keys.

Grid: ``num_splits`` contiguous item ranges x query groups of ``QB``. A program walks its range
one tile at a time, keeping a sorted running top-``KT`` in registers; its worst key is a running
threshold, and a tile in which no key beats it skips selection entirely (after the first few
tiles, most do). Otherwise the tile's top ``KT`` (``tl.topk``, bitonic) is merged in with one
bitonic merge: the elementwise max of a descending and an ascending run holds the best ``KT`` of
both. Keys carry exclusions and ties (see ``recjpq.topk_keys``), so stage 2 is a plain
``torch.topk`` over ``num_splits * KT`` candidates per query: nothing of size B x N is stored.
"""
import triton
import triton.language as tl

from recjpq.kernels.pq_lookup import (INTERPRETED, MAX_REGISTERS, empty_key, merge_tile, program_items, score_tile,
                                     store_best, tile_items)

_CONFIGS = [triton.Config({"BLOCK_N": 64, "QB": 2})] if INTERPRETED else [
    # few configs: each one compiles in seconds on the host, once per autotuning key. With more
    # than 4 items of a tile per thread, QB = 1 configs spilled under Triton 3.6 (compile matrix).
    triton.Config({"BLOCK_N": 512, "QB": 1}, num_warps=4, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 1024, "QB": 1}, num_warps=8, maxnreg=MAX_REGISTERS),
    triton.Config({"BLOCK_N": 1024, "QB": 4}, num_warps=8, maxnreg=MAX_REGISTERS),
]


def key_slots(k: int) -> int:
    """``KT``, the keys each program keeps: a power of two >= k, and >= 2 (Triton's bitonic merge
    does not compile for one key, so k = 1 keeps two)."""
    return max(2, triton.next_power_of_2(k))


@triton.constexpr_function
def tile_size(block_n, kt):
    """Items per tile: at least ``KT``, since ``tl.topk`` selects ``KT`` of them."""
    return max(block_n, kt)


def _prune(configs, named_args, **kwargs):
    """Drop query groups wider than the batch, wide groups when the tile or the kept keys are large
    (QB = 4 at KT = 1024 spilled on sm_90 under Triton 3.9), and configs where a thread would hold
    more than 4 items of a tile (KT > BLOCK_N widens the tile)."""
    args = {**named_args, **kwargs}
    batch, kt = args["B_BUCKET"], args["KT"]
    fits = [c for c in configs if tile_size(c.kwargs["BLOCK_N"], kt) <= 4 * 32 * c.num_warps]
    kept = [c for c in fits if c.kwargs["QB"] <= batch and c.kwargs["QB"] * kt <= 2048
            and c.kwargs["QB"] * tile_size(c.kwargs["BLOCK_N"], kt) <= 4096]
    return kept or fits[:1] or configs[:1]


@triton.autotune(configs=_CONFIGS, key=["M", "K", "B_BUCKET", "KT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["B", "N", "E", "num_splits", "B_BUCKET"])
def pq_topk_kernel(S, codes_t, stride, exclude_sorted, cand, B, N, E, num_splits, B_BUCKET,
                   M: tl.constexpr, K: tl.constexpr, KT: tl.constexpr, EXCLUDE_STEPS: tl.constexpr,
                   BLOCK_N: tl.constexpr, QB: tl.constexpr):
    TILE: tl.constexpr = tile_size(BLOCK_N, KT)
    split, rows, row_ok, first, last = program_items(B, N, num_splits, TILE, QB)
    best = tl.full((QB, KT), empty_key(), tl.int64)  # descending
    for tile in range(first, last):
        start, items, item_ok = tile_items(tile, TILE, N)
        scores = score_tile(S, codes_t, stride, rows, row_ok, items, item_ok, M, K)
        best = merge_tile(best, scores, rows, row_ok, start, items, item_ok, exclude_sorted, E, KT, EXCLUDE_STEPS)
    store_best(cand, best, rows, row_ok, split, num_splits, KT)
