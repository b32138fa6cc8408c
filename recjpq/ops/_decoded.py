"""``pq_topk_query``'s ``"matmul"`` algorithm: BLAS over the decoded item table, rescored exactly.

Where the catalogue is small and the batch large, one float32 GEMM over the decoded ``[N, d]``
table beats any per-item lookup scan. The table is decoded once per (codes, centroids) and
cached; a later call with the same tensors, unchanged, reuses it.

The GEMM sums in its own order, so its scores ``a_i`` differ from the exact S sums ``x_i`` by
at most ``margin`` (below). Each query keeps its ``k + EXTRA`` best approximate items; if the
last of them scores below ``T - 2 * margin`` (``T`` = its k-th approximate score), every item
that can reach the exact top-k, ties included, is among them (the proof in
docs/triton-kernels.md, "Why no exact top-k item is dropped"), and they are rescored from S,
splits added in order, into the reference's values, indices and tie order. Queries whose
candidates do not fit are answered by the LUT scan.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from recjpq.topk_keys import EMPTY_KEY, pack_keys, unpack_keys

EXTRA = 8  # candidates beyond k per query: room for items within 2 * margin of the k-th score
_UNIT = 2.0 ** -23  # float32 rounding error bound per operation (twice round-to-nearest's 2^-24)
_SAFE_BOUND = 2.0 ** 100  # |scores| bound under which no float32 partial sum can overflow


class DecodedTable:
    """The decoded items transposed, ``[d, N]`` float32 (``torch.mm(q, table)`` reads it
    row-major, measured faster than ``q @ items.T``), and per-dimension ``max |centroid|``."""

    def __init__(self, codes: torch.Tensor, centroids: torch.Tensor):
        m = codes.shape[1]
        with torch.no_grad():
            c = centroids.detach().float()
            items = c[torch.arange(m, device=codes.device), codes.long()]  # [N, M, d/M]
            self.table = items.flatten(1).t().contiguous()
            self.abs_max = centroids.detach().double().abs().amax(dim=1).reshape(-1)  # [d]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the algorithm cannot run here (the margin assumes IEEE float32 matmuls on CPU)."""
    if device.type != "cpu":
        return f"it runs on CPU tensors only, got {device.type}"
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.mkldnn.matmul.fp32_precision not in (
            "none", "ieee"):
        return "float32 matmuls run in reduced precision (torch.set_float32_matmul_precision)"
    return None


def prefers_matmul(batch: int, n: int, d: int, m: int, k: int, device: torch.device) -> bool:
    """Whether ``algorithm="auto"`` takes the decoded table, from the shape grid's crossovers."""
    return False


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


def _round_down(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 not above it."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, y.new_tensor(float("-inf"))), y)


def exact_scores(S: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` scores of the items ``ids [B, C]`` from S, splits added in order m = 0..M-1 in
    float32 as the reference does (bit-identical values; differentiable in S)."""
    batch, m, _ = S.shape
    rows = torch.arange(batch, device=S.device).view(batch, 1, 1)
    picked = S[rows, torch.arange(m, device=S.device), codes[ids].long()]  # [B, C, M], any S strides
    scores = picked[..., 0]
    for j in range(1, m):
        scores = scores + picked[..., j]
    return scores


def matmul_topk(query, centroids, S, codes, k, exclude, lut):
    """Exact top-k (``pq_topk_query``'s semantics) from the decoded table; ``lut(S_rows,
    exclude_rows)`` answers the queries whose candidates overflow. Inputs are validated."""
    n = codes.shape[0]
    table = decoded_table(codes, centroids)
    with torch.no_grad():
        approx = torch.mm(query.detach().float(), table.table)  # [B, N]
        if exclude is not None and exclude.numel():
            rows, cols = (exclude >= 0).nonzero(as_tuple=True)
            approx[rows, exclude[rows, cols]] = float("-inf")
        width = min(n, k + EXTRA)
        top, ids = torch.topk(approx, width, dim=1)
        margin, bound = score_margin(query, centroids, table.abs_max)
        kth = top[:, k - 1]
        threshold = _round_down(kth.double() - 2 * margin)
        # kth = -inf: fewer than k allowed items, all of them among the candidates
        fits = (top[:, -1] < threshold) | (kth == float("-inf")) | (width == n)
        keys = pack_keys(exact_scores(S.detach(), codes, ids), ids).masked_fill_(top == float("-inf"), EMPTY_KEY)
        values, indices = unpack_keys(torch.topk(keys, k, dim=1).values)
        redo = (~fits | (bound >= _SAFE_BOUND)).nonzero().flatten()
    if redo.numel():
        rows_exclude = None if exclude is None else exclude[redo].contiguous()
        values[redo], indices[redo] = lut(S.detach()[redo].contiguous(), rows_exclude)
    if S.requires_grad:  # the same float32 sums again, recorded for autograd
        found = indices >= 0
        values = exact_scores(S, codes, indices.clamp(min=0)).masked_fill(~found, float("-inf"))
    return values, indices
