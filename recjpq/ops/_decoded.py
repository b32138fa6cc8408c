"""``pq_topk_query``'s ``"matmul"`` algorithm: BLAS over the decoded item table, rescored exactly.

Where the catalogue is small and d/M small, one float32 GEMM over the decoded ``[N, d]`` table
beats any per-item lookup scan. The table is decoded once per (codes, centroids) and cached; a
later call with the same tensors, unchanged, reuses it. The GEMM sums in its own order, so the cpu
kernel (csrc/cpu/pq_topk_decoded.cpp) rescores from S, splits added in order, every item its error
margin cannot rule out, which gives the reference's values, indices and tie order.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from recjpq._codes_cache import same_tensor, tensor_key


class DecodedTable:
    """The decoded items transposed, ``[d, N]`` float32 (``torch.mm(q, table)`` reads it
    row-major, measured faster than ``q @ items.T``), per-dimension ``max |centroid|`` for the
    margin, the centroids as ``[M, d/M, K]`` (the C++ sub-item table reads them so), and the codes
    snapshot it was decoded from: the cpu backend's blocked copy, range-checked on that copy, which
    the rescoring reads (so a caller's write to ``codes`` during the call cannot send it to another
    split's or query's scores), and the same rows as int64 for autograd."""

    def __init__(self, codes: torch.Tensor, centroids: torch.Tensor):
        from recjpq.backends import cpu

        m, num_codes = codes.shape[1], centroids.shape[1]
        info = cpu.snapshot(codes, num_codes)  # [ceil(N / 64), M, 64] blocks
        self.blocked, self.n = info.blocked, info.n
        with torch.no_grad():
            self.codes = info.blocked.transpose(1, 2).reshape(-1, m)[:info.n].long()
            c = centroids.detach().float()
            items = c[torch.arange(m, device=codes.device), self.codes]  # [N, M, d/M]
            self.table = items.flatten(1).t().contiguous()
            self.abs_max = centroids.detach().double().abs().amax(dim=1).reshape(-1)  # [d]
            self.centroids_t = c.transpose(1, 2).contiguous()  # [M, d/M, K]: the C++ table's input


def unavailable_reason(device: torch.device) -> str | None:
    """Why the algorithm cannot run here (the margin assumes IEEE float32 matmuls on CPU)."""
    from recjpq.backends import cpu

    if device.type != "cpu":
        return f"it runs on CPU tensors only, got {device.type}"
    if cpu.unavailable_reason(device) is not None:
        return cpu.unavailable_reason(device)
    if torch.get_float32_matmul_precision() != "highest" or torch.backends.mkldnn.matmul.fp32_precision not in (
            "none", "ieee"):
        return "float32 matmuls run in reduced precision (torch.set_float32_matmul_precision)"
    return None


def prefers_matmul(batch: int, n: int, d: int, m: int, k: int) -> bool:
    """Whether ``algorithm="auto"`` takes the decoded table (where ``unavailable_reason`` allows it):
    the crossovers of ``bench/shape_grid.py --variants lut matmul`` (docs/cpu-kernel.md, "Dispatch
    and crossover"; 1 thread, N in 3,417-100,000, B in 8-512, d in 64-128, M in 8-32, k in 10-100).
    The scan's work grows with M and k, the GEMM's with d: the table pays for short splits (d/M <=
    8), larger batches or k, and catalogues whose table stays in cache (N x d <= 1.3M floats)."""
    dsub, size = d // m, n * d
    if size > 1_300_000 or dsub > 8:
        return False
    if dsub <= 2:
        if size <= 500_000:
            return batch >= 64 or (batch >= 8 and k > 16)
        return batch >= 512 or (batch >= 64 and k > 16)
    if dsub <= 4:
        if size <= 500_000:
            return batch >= 512 or (batch >= 64 and k > 16)
        return k > 16 and (batch >= 512 or (batch >= 64 and size <= 1_000_000))
    return k > 16 and (batch >= 512 or (batch >= 64 and size <= 500_000))


# codes owner tensor -> (codes key, centroids ref, centroids key, DecodedTable): one table per codes
# tensor (training replaces the centroids at every step; the stale table is dropped, not kept).
_TABLES = WeakIdKeyDictionary()


# this thread's last answer, checked first (the same tensors call after call; the owner lookup
# costs another microsecond)
_last = threading.local()
_cleared = 0  # clear_decoded_tables() calls so far: a last answer from before one is stale


def decoded_table(codes: torch.Tensor, centroids: torch.Tensor) -> DecodedTable:
    """The cached table of ``(codes, centroids)``, rebuilt if either tensor changed since: another
    tensor, an in-place edit or an optimizer step (the version counter), another view. Edits made
    through ``.data`` bypass the version counter; call ``clear_decoded_tables()`` after them."""
    last = getattr(_last, "hit", None)
    if (last is not None and last[5] == _cleared and same_tensor(last[0], last[1], codes)
            and same_tensor(last[2], last[3], centroids)):
        return last[4]
    table = _lookup(codes, centroids)
    _last.hit = (weakref.ref(codes), tensor_key(codes), weakref.ref(centroids), tensor_key(centroids), table, _cleared)
    return table


def _lookup(codes: torch.Tensor, centroids: torch.Tensor) -> DecodedTable:
    owner = codes if codes._base is None else codes._base
    entry = _TABLES.get(owner)
    codes_key, centroids_key = tensor_key(codes), tensor_key(centroids)
    if entry is not None and entry[0] == codes_key and entry[1]() is centroids and entry[2] == centroids_key:
        return entry[3]
    table = DecodedTable(codes, centroids)
    _TABLES[owner] = (codes_key, weakref.ref(centroids), centroids_key, table)
    return table


def clear_decoded_tables() -> None:
    """Drop every cached decoded table (every thread's last answer included)."""
    global _cleared
    _TABLES.clear()
    _cleared += 1


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


def matmul_topk(query, centroids, S, codes, k, exclude):
    """Exact top-k (``pq_topk_query``'s semantics) from the decoded table, by the cpu kernel, which
    checks S finite and the exclusion ids on the data it reads; the codes were range-checked on the
    snapshot the table holds. ``S``: ``subitem_scores``'s table, or None where it is the C++
    kernel's at any batch (``cpu_kernel_at_any_batch``), which the cpu kernel then computes."""
    from recjpq.backends import cpu

    table = decoded_table(codes, centroids)
    values, indices = torch.ops.recjpq_cpu.pq_topk_decoded(
        query.detach().float().contiguous(), table.centroids_t,
        None if S is None else S.detach().contiguous(), table.table, table.abs_max, table.blocked, table.n, k, exclude,
        cpu.simd_level())
    if S is not None and S.requires_grad:  # the same float32 sums again, recorded for autograd
        found = indices >= 0
        values = exact_scores(S, table.codes, indices.clamp(min=0)).masked_fill(~found, float("-inf"))
    return values, indices
