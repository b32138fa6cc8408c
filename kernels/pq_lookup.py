"""Building blocks shared by the PQ kernels: scoring a tile of items for a group of queries from
the sub-item score table S, and turning scores into packed int64 top-k keys.

Whether ``@triton.jit`` compiles or interprets is decided when a kernel is decorated, i.e. when
these modules are imported: ``INTERPRETED`` records that choice for the backend.

Every kernel lists its size arguments in ``do_not_specialize``: Triton would otherwise compile
N = 1 as a constexpr (which has no ``.to``) and N % 16 == 0 as a separate kernel. The codes' row
stride is the one size left specialised: it is a multiple of 16, which vectorises the code loads.
"""
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
# The selection kernels' configs set ptxas's register limit explicitly: without one, the ptxas of
# Triton 3.6 settled on 96 (4 warps) or 128 (8 warps) registers and spilled where up to 255 fit
# without spills (compile matrix: the top-k kernel at KT = 128 with exclusions, 24 B -> 168
# registers and none).
MAX_REGISTERS = 255


@triton.jit
def load_codes(codes_t, stride, m, items):
    """Split ``m``'s codes of ``items`` from the padded split-major copy ``[M, stride]``.

    ``stride`` is a multiple of 16 (``recjpq.backends.triton.codes_stride``), so Triton knows each
    row is 16-byte aligned and, masking on ``stride`` rather than N, loads a thread's contiguous
    codes in one vector load instead of byte by byte; the padding holds code 0.
    """
    return tl.load(codes_t + m * stride.to(tl.int64) + items, mask=items < stride, other=0).to(tl.int32)


@triton.jit
def score_tile(S, codes_t, stride, rows, row_ok, items, item_ok, M: tl.constexpr, K: tl.constexpr):
    """Scores ``[QB, BLOCK]`` of ``items`` for the queries ``rows``, summed over splits 0..M-1 in order.

    ``codes_t`` is the padded ``[M, stride]`` (split-major) copy of the codes, so each split's codes
    load coalesced; the S rows are gathered through L1, where one query's ``M x K`` table stays
    hot. Adding splits in the reference's order makes the sums bit-identical to it.
    """
    table = S + rows.to(tl.int64)[:, None] * (M * K)
    ok = row_ok[:, None] & item_ok[None, :]
    acc = tl.zeros((rows.shape[0], items.shape[0]), dtype=tl.float32)
    for m in tl.static_range(M):
        code = load_codes(codes_t, stride, m, items)
        acc += tl.load(table + (m * K + code)[None, :], mask=ok, other=0.0)
    return acc


@triton.jit
def ordered_bits(scores):
    """int32 that orders as the float scores do (-0.0 folded into +0.0): a key's high half."""
    bits = scores.to(tl.int32, bitcast=True)
    bits = tl.where(scores == 0.0, 0, bits)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def pack_keys(scores, items):
    """The ``recjpq.topk_keys`` packing: ordered float bits high, ``2**32 - 1 - item`` low."""
    ordered = ordered_bits(scores)
    low = ((tl.full((), 1, tl.int64) << 32) - 1) - items.to(tl.int64)  # all-int64: no uint32 literal
    return (ordered.to(tl.int64) << 32) | low[None, :]


@triton.jit
def empty_key():
    """``recjpq.topk_keys.EMPTY_KEY`` (int64 min): an excluded, padded or missing item."""
    return tl.full((), 1, tl.int64) << 63


@triton.jit
def count_below(row_ptr, row_ok, length, target, STEPS: tl.constexpr):
    """Per row, how many entries of an ascending row of ``length`` are ``< target`` (branch-free
    binary search; ``2**STEPS > length``)."""
    pos = tl.zeros(row_ok.shape, dtype=tl.int32)
    for s in tl.static_range(STEPS):
        probe = pos + (1 << (STEPS - 1 - s))
        value = tl.load(row_ptr + probe - 1, mask=row_ok & (probe <= length), other=target)
        pos = tl.where(value < target, probe, pos)
    return pos


@triton.jit
def excluded_mask(exclude_sorted, rows, row_ok, E, start, items, STEPS: tl.constexpr):
    """``[QB, BLOCK]`` true where ``items[j]`` is in query row's exclusion list.

    Rows of ``exclude_sorted`` are ascending, so the ids falling in ``[start, start + BLOCK)`` are
    one run found by two binary searches; each of them costs one compare against the tile.
    """
    row_ptr = exclude_sorted + rows.to(tl.int64) * E
    lo = count_below(row_ptr, row_ok, E, start.to(tl.int64), STEPS)
    hi = count_below(row_ptr, row_ok, E, start.to(tl.int64) + items.shape[0], STEPS)
    hit = tl.zeros((rows.shape[0], items.shape[0]), dtype=tl.int1)
    for t in range(0, tl.max(hi - lo)):
        ids = tl.load(row_ptr + lo + t, mask=row_ok & (lo + t < hi), other=-1)
        hit |= ids[:, None] == items[None, :].to(tl.int64)
    return hit


@triton.jit
def program_items(B, N, num_splits, TILE: tl.constexpr, QB: tl.constexpr):
    """This program's share of a ``num_splits`` x query-groups grid: ``(split, rows [QB],
    row_ok, first tile, end tile)``; splits are contiguous ranges of ``TILE``-item tiles."""
    pid = tl.program_id(0)
    groups = tl.cdiv(B, QB)
    split = pid // groups
    rows = (pid % groups) * QB + tl.arange(0, QB)
    tiles = tl.cdiv(N, TILE)
    per_split = tl.cdiv(tiles, num_splits)
    first = split * per_split
    return split, rows, rows < B, first, tl.minimum(first + per_split, tiles)


@triton.jit
def tile_items(tile, TILE: tl.constexpr, N):
    """``(start, items [TILE], item_ok)`` of a program's ``tile``-th tile of ``TILE`` items."""
    start = tile * TILE
    items = start + tl.arange(0, TILE)
    return start, items, items < N


@triton.jit
def merge_tile(best, scores, rows, row_ok, start, items, item_ok, exclude_sorted, E, KT: tl.constexpr,
               EXCLUDE_STEPS: tl.constexpr):
    """Running descending top-``KT`` ``best [QB, KT]`` updated with a tile's ``scores [QB, TILE]``;
    padding rows, items past ``N`` and excluded items enter as empty keys.

    A tile where no key beats a row's worst kept key skips selection (most tiles, once the
    threshold settles), and only then are exclusions looked up (two dependent binary searches
    per row). A tile that passes merges its top ``KT`` in with one bitonic merge: the
    elementwise max of a descending and an ascending run holds the best ``KT`` of both.
    ``KT >= 2``: Triton's bitonic merge of a ``[QB, 1]`` run does not compile.
    """
    valid = row_ok[:, None] & item_ok[None, :]
    # The test compares 32-bit ordered scores (ties with the worst kept key pass, to be settled
    # exactly below): the 64-bit keys of the tile and the exclusion search are only live in the
    # branch, one after the other, which keeps registers from spilling.
    worst = (tl.min(best, axis=1) >> 32).to(tl.int32)
    if tl.max((valid & (ordered_bits(scores) >= worst[:, None])).to(tl.int32)) > 0:
        if EXCLUDE_STEPS > 0:
            valid &= ~excluded_mask(exclude_sorted, rows, row_ok, E, start, items, EXCLUDE_STEPS)
        keys = tl.where(valid, pack_keys(scores, items), empty_key())
        top = tl.topk(keys, KT, dim=1)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), descending=True)
    return best


@triton.jit
def store_best(cand, best, rows, row_ok, split, num_splits, KT: tl.constexpr):
    """``best`` to ``cand[B, num_splits, KT]`` (stage 2 merges the splits with ``torch.topk``)."""
    offsets = (rows.to(tl.int64)[:, None] * num_splits + split) * KT + tl.arange(0, KT)[None, :]
    tl.store(cand + offsets, best, mask=row_ok[:, None])
