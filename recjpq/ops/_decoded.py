"""``pq_topk_query``'s ``"matmul"`` algorithm: BLAS over the decoded item table, rescored exactly.

Where the catalogue is small and the batch large, one float32 GEMM over the decoded ``[N, d]``
table beats any per-item lookup scan. The table is decoded once per (codes, centroids) and
cached; a later call with the same tensors, unchanged, reuses it.

The GEMM sums in its own order, so its scores ``a_i`` differ from the exact S sums ``x_i`` by
at most ``margin`` (``score_margin``). A pool of candidates per query is rescored from S, splits
added in order, into the reference's values, indices and tie order, once the approximate scores
prove that no item outside the pool can reach the pool's top-k (``matmul_topk``). Queries where
the proof fails are answered by the LUT scan.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from recjpq._validate import check_values
from recjpq.topk_keys import EMPTY_KEY, pack_keys, unpack_keys

EXTRA = 4  # blocks kept beyond k (+ k / 4, for blocks holding several of the top k) per step
_UNIT = 2.0 ** -23  # float32 rounding error bound per operation (twice round-to-nearest's 2^-24)
_SAFE_BOUND = 2.0 ** 100  # |scores| bound under which no float32 partial sum can overflow


class DecodedTable:
    """The decoded items transposed, ``[d, N]`` float32 (``torch.mm(q, table)`` reads it
    row-major, measured faster than ``q @ items.T``), per-dimension ``max |centroid|`` for the
    margin, and int64 codes for the rescoring."""

    def __init__(self, codes: torch.Tensor, centroids: torch.Tensor):
        m, num_codes = codes.shape[1], centroids.shape[1]
        with torch.no_grad():
            self.codes = _validated_rows(codes, num_codes)  # decoding and rescoring read only this copy
            c = centroids.detach().float()
            items = c[torch.arange(m, device=codes.device), self.codes]  # [N, M, d/M]
            self.table = items.flatten(1).t().contiguous()
            self.abs_max = centroids.detach().double().abs().amax(dim=1).reshape(-1)  # [d]


def _validated_rows(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """int64 ``[N, M]`` codes from one private copy whose range was checked on that copy (the cpu
    backend's snapshot where the extension is built), so a caller's write to ``codes`` during the
    call cannot send the decoding or the rescoring to another split's or query's scores."""
    from recjpq.backends import cpu

    if cpu.unavailable_reason(codes.device) is None:
        info = cpu.snapshot(codes, num_codes)  # [ceil(N / 64), M, 64] blocks, range-checked
        return info.blocked.transpose(1, 2).reshape(-1, codes.shape[1])[:info.n].long()
    rows = codes.long()  # a copy
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"codes must lie in [0, K={num_codes}), got values in [{lo}, {hi}]")
    return rows


def unavailable_reason(device: torch.device) -> str | None:
    """Why the algorithm cannot run here (the margin assumes IEEE float32 matmuls on CPU)."""
    if device.type != "cpu":
        return f"it runs on CPU tensors only, got {device.type}"
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.mkldnn.matmul.fp32_precision not in (
            "none", "ieee"):
        return "float32 matmuls run in reduced precision (torch.set_float32_matmul_precision)"
    return None


def prefers_matmul(batch: int, n: int, d: int, m: int, k: int, device: torch.device) -> bool:
    """Whether ``algorithm="auto"`` takes the decoded table: the crossovers of ``bench/shape_grid.py
    --variants lut matmul`` (docs/cpu-kernel.md, "Dispatch and crossover"; 1 thread, N in 3.4k-10k,
    B in 64-512, re-measured once the scan's B = 1 cost fell from 24.5 to 11 us, not since its
    AVX-512 byte table). The GEMM pays only for large batches over small catalogues with many
    splits (the LUT scan's work grows with M, the GEMM's with d) and small k."""
    if batch < 512 or m < 16 or k > 16 or unavailable_reason(device) is not None:
        return False
    return n * (d // m) <= 40_000


def _key(t: torch.Tensor):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


# codes owner tensor -> (codes key, centroids ref, centroids key, DecodedTable): one table per codes
# tensor (training replaces the centroids at every step; the stale table is dropped, not kept).
_TABLES = WeakIdKeyDictionary()


def decoded_table(codes: torch.Tensor, centroids: torch.Tensor) -> DecodedTable:
    """The cached table of ``(codes, centroids)``, rebuilt if either tensor changed since: another
    tensor, an in-place edit or an optimizer step (the version counter), another view. Edits made
    through ``.data`` bypass the version counter; call ``clear_decoded_tables()`` after them."""
    owner = codes if codes._base is None else codes._base
    entry = _TABLES.get(owner)
    codes_key, centroids_key = _key(codes), _key(centroids)
    if entry is not None and entry[0] == codes_key and entry[1]() is centroids and entry[2] == centroids_key:
        return entry[3]
    table = DecodedTable(codes, centroids)
    _TABLES[owner] = (codes_key, weakref.ref(centroids), centroids_key, table)
    return table


def clear_decoded_tables() -> None:
    """Drop every cached decoded table."""
    _TABLES.clear()


def score_margin(query: torch.Tensor, centroids: torch.Tensor, abs_max: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]`` bounds on ``|a_i - x_i|`` over every item, for each query.

    With ``A_b = sum_j |q_bj| max_k |centroids[., k, j]|`` bounding ``sum_j |q_bj item_ij|``: the
    GEMM's d products and additions (any order) err by ``d * u`` relative to A_b, to first order;
    S's einsum by ``d/M * u`` and its float32 split sum by ``M * u``; 3 casts (float64 / float16
    inputs); 2% covers the second-order terms (``d * u <= 2^-8``). ``u = 2^-23``: the CPU's
    float32 arithmetic rounds to nearest (``2^-24``), with a factor 2 to spare.
    """
    m, _, dsub = centroids.shape
    bound = query.detach().double().abs() @ abs_max
    return 1.02 * (m * dsub + dsub + m + 3) * _UNIT * bound, bound


def exact_scores(S: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` scores of the items ``ids [B, C]`` from S, splits added in order m = 0..M-1 in
    float32 as the reference does (bit-identical values; differentiable in S). ``codes``: int64
    ``[N, M]``. S is read split-major, the layout ``subitem_scores`` returns (no copy)."""
    batch, m, num_codes = S.shape
    flat = S.transpose(0, 1).reshape(-1)  # [M * B * K]
    index = codes.index_select(0, ids.reshape(-1)).view(*ids.shape, m)  # [B, C, M]
    index = index + (torch.arange(m, device=S.device) * (batch * num_codes)
                     + (torch.arange(batch, device=S.device) * num_codes).view(batch, 1, 1))
    picked = flat.take(index)
    scores = picked[..., 0]
    for j in range(1, m):
        scores = scores + picked[..., j]
    return scores


def _select_blocks(values, ids, kept: int, cut):
    """One narrowing step: the ``kept`` blocks with the largest maximum, plus the tail past the
    last whole block. Block j of s holds positions j, j + C/s, ... (one strided reduction), and C/s
    is kept at or below 192: torch.topk over so few columns is a few times faster per column than
    over the thousands in between (measured, torch 2.13 CPU). Returns None when blocks would not
    narrow the pool."""
    batch, width = values.shape
    size = 1
    while size < width and width // size > 192:
        size *= 2
    num_blocks = width // size
    if size == 1 or kept * size >= width:
        return None
    maxima = values[:, :num_blocks * size].view(batch, size, num_blocks).amax(dim=1)
    top_max, blocks = torch.topk(maxima, min(kept, num_blocks), dim=1, sorted=False)
    pos = (blocks.unsqueeze(2) + torch.arange(0, num_blocks * size, num_blocks)).view(batch, -1)
    pos = torch.cat([pos, torch.arange(num_blocks * size, width).expand(batch, -1)], dim=1)
    cut = top_max.amin(dim=1) if cut is None else torch.maximum(cut, top_max.amin(dim=1))
    return values.gather(1, pos), (pos if ids is None else ids.gather(1, pos)), cut


def matmul_topk(query, centroids, S, codes, k, exclude, lut):
    """Exact top-k (``pq_topk_query``'s semantics) from the decoded table; ``lut(S_rows,
    exclude_rows)`` answers the queries whose candidates do not fit. Metadata are validated; the
    values (code and exclusion ranges, a finite S) are checked here, before the GEMM.

    Each query narrows its pool of items (at first the catalogue, excluded items at -inf) by
    ``_select_blocks`` until it holds at most ``4 * kept`` items, ``kept = k + EXTRA + k // 4``,
    and rescores the pool exactly. ``cut``, the largest block maximum left out on the way, bounds
    every item left out. With ``x_k`` the pool's exact k-th score, k allowed items have
    ``a >= x_k - margin``, so the catalogue's exact k-th score is at least ``x_k - 2 * margin``
    and every item reaching it, ties included, has ``a >= x_k - 3 * margin``: if ``cut`` is below
    that, the pool's top-k is the catalogue's (docs/cpu-kernel.md, "Dispatch and crossover").
    Should the pool hold fewer than k allowed items, every block left out was all excluded (a
    block with a finite maximum left out means ``kept`` blocks kept with finite maxima), and
    ``cut = -inf`` says so.
    """
    n = codes.shape[0]
    batch = S.shape[0]
    check_values(S, codes, exclude, finite=True)  # code ranges first: decoding indexes with them
    table = decoded_table(codes, centroids)
    margin, bound = score_margin(query, centroids, table.abs_max)
    safe = bound < _SAFE_BOUND  # |S| <= bound: S is finite (nan and inf fail the comparison)
    if not bool(safe.all()):
        check_values(S, codes, exclude)  # the elementwise test, which raises on a non-finite S
    inf = float("-inf")
    with torch.no_grad():
        approx = torch.mm(query.detach().float(), table.table)  # [B, N]
        if exclude is not None and exclude.numel():
            rows, cols = (exclude >= 0).nonzero(as_tuple=True)
            approx[rows, exclude[rows, cols]] = inf
        kept = k + EXTRA + k // 4
        pool, ids, cut = approx, None, None  # cut: the largest block maximum left out so far
        while pool.shape[1] > 4 * kept:
            step = _select_blocks(pool, ids, kept, cut)
            if step is None:  # blocks do not narrow it (k near N / 192): keep the best items themselves
                top, pos = torch.topk(pool, kept, dim=1, sorted=False)
                cut = top.amin(dim=1) if cut is None else torch.maximum(cut, top.amin(dim=1))
                pool, ids = top, (pos if ids is None else ids.gather(1, pos))
                break
            pool, ids, cut = step
        if ids is None:
            ids = torch.arange(n).expand(batch, -1)
        keys = pack_keys(exact_scores(S.detach(), table.codes, ids), ids).masked_fill_(pool == inf, EMPTY_KEY)
        values, indices = unpack_keys(torch.topk(keys, k, dim=1).values)
        fits = safe
        if cut is not None:  # cut = -inf: everything left out is excluded
            fits &= (cut == inf) | (cut.double() < values[:, k - 1].double() - 3 * margin)
        redo = None if bool(fits.all()) else (~fits).nonzero().flatten()
    if redo is not None:
        rows_exclude = None if exclude is None else exclude[redo].contiguous()
        values[redo], indices[redo] = lut(S.detach()[redo].contiguous(), rows_exclude)
    if S.requires_grad:  # the same float32 sums again, recorded for autograd
        found = indices >= 0
        values = exact_scores(S, table.codes, indices.clamp(min=0)).masked_fill(~found, inf)
    return values, indices
