"""The "cpu" backend: fused C++ kernels (``recjpq._C``, ops ``torch.ops.recjpq_cpu.*``).

Codes are copied once per codes tensor into blocks of 64 items stored split-major (the private
snapshot of ``recjpq._codes_cache``, range-checked on the copy), which the AVX-512 / AVX2 / scalar
scorers read as whole registers. The kernels read that snapshot and layouts derived from it only,
never the caller's codes, so concurrent or hidden writes to the codes cannot crash them.
``RECJPQ_CPU_SIMD=scalar|avx2|avx512`` forces one SIMD path (default: the best the CPU has).

``algorithm="prune"`` walks an inverted index from the best sub-ids down and stops when no unseen
item can reach the k-th score (exact). ``"auto"`` scans exhaustively: measured on a 2-core AVX-512
machine (docs/cpu-kernel.md), pruning is 4.5x slower on random S and at best ~2.5x faster per core
on strongly peaked S, while the exhaustive scan uses every core even for one query.
"""
from __future__ import annotations

import functools
import os

import torch

from recjpq._codes_cache import CodesInfo, codes_info

try:
    import recjpq._C  # noqa: F401  (loads the recjpq_cpu ops)
    _IMPORT_ERROR = None
except ImportError as e:  # built without extensions (RECJPQ_NO_EXT=1) or a broken build
    _IMPORT_ERROR = e

SIMD_ENV = "RECJPQ_CPU_SIMD"
SIMD_LEVELS = ("auto", "scalar", "avx2", "avx512")
# pq_topk (exhaustive and pruned) checks S finite and exclusion ids in range in C++, on the very
# data it scans, so recjpq.ops.run_topk skips its own pass over them (a third of a B = 1 call at N = 3.4k)
checks_values = True


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "it runs on CPU tensors only"
    if _IMPORT_ERROR is not None:
        return f"the compiled extension recjpq._C is missing ({_IMPORT_ERROR})"
    return None


def simd_level() -> str:
    """The SIMD path the kernels will take: ``RECJPQ_CPU_SIMD`` if set, else the best supported."""
    return _resolved_simd(os.environ.get(SIMD_ENV, "auto") or "auto")


@functools.lru_cache(maxsize=None)
def _resolved_simd(level: str) -> str:
    if level not in SIMD_LEVELS:
        raise ValueError(f"{SIMD_ENV} must be one of {SIMD_LEVELS}, got {level!r}")
    if level != "auto" and not torch.ops.recjpq_cpu.simd_supported(level):
        raise RuntimeError(f"{SIMD_ENV}={level} forces a SIMD path this CPU (or build) does not support")
    return torch.ops.recjpq_cpu.simd_resolved(level)


def simd_supported(level: str) -> bool:
    return bool(torch.ops.recjpq_cpu.simd_supported(level))


def snapshot(codes: torch.Tensor, num_codes: int) -> CodesInfo:
    """The private, range-checked snapshot of ``codes`` (``recjpq._codes_cache``): the kernels below
    read nothing else, so the range they rely on is the range of the very data they scan."""
    info = codes_info(codes)
    info.check_range(num_codes)
    return info


def prune_index(info: CodesInfo, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(offsets [M, K + 1], items [M * N], rows [N, M])`` of a snapshot: per split, the items
    holding each sub-id, and the snapshot row-major. Built once per snapshot and K."""
    key = ("cpu_prune_index", num_codes)
    if key not in info.prepared:
        info.prepared[key] = torch.ops.recjpq_cpu.prune_index(info.blocked, info.n, num_codes)
    return info.prepared[key]


def topk_query_small(query, centroids, codes, k, exclude, kernel_rows, decoded=None):
    """``pq_topk_query``'s result in one C++ call (table + scan, csrc/cpu/pq_topk_query.cpp) for
    arguments that ``recjpq.ops`` has screened (a few CPU queries, no autograd), or None where the
    extension or a precondition is missing (the caller then runs the general path). The table is
    ``subitem_scores``'s: the C++ kernel up to ``kernel_rows`` queries or up to 8 dimensions per
    split, the batched matmul otherwise. ``decoded``: the catalogue's ``DecodedTable``, for the
    "matmul" algorithm; it reads the snapshot that table was decoded from."""
    if decoded is not None:  # its snapshot was range-checked for these centroids
        return recjpq._C.pq_topk_query_small(query, centroids, decoded.blocked, decoded.n, k, exclude, simd_level(),
                                             kernel_rows, decoded.table, decoded.abs_max, decoded.centroids_t)
    if _IMPORT_ERROR is not None or codes.shape[0] == 0 or codes.shape[1] == 0:
        return None
    info = codes_info(codes)
    if info.min_code < 0 or info.max_code >= centroids.shape[1]:
        return None
    return recjpq._C.pq_topk_query_small(query, centroids, info.blocked, info.n, k, exclude, simd_level(),
                                         kernel_rows)


def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    info = snapshot(codes, S.shape[2])
    return torch.ops.recjpq_cpu.pq_scores(S, info.blocked, info.n, simd_level())


def _exhaustive(S, info, k, exclude):
    return torch.ops.recjpq_cpu.pq_topk(S, info.blocked, info.n, k, exclude, simd_level())


def _pruned(S, info, k, exclude, max_visits):
    """Pruned top-k; queries that score ``max_visits`` items without proving their top-k are rescanned."""
    offsets, items, rows = prune_index(info, S.shape[2])
    values, indices, visited = torch.ops.recjpq_cpu.pq_topk_prune(S, rows, offsets, items, k, exclude, max_visits)
    gave_up = (visited < 0).nonzero().flatten()
    if gave_up.numel():
        rest = None if exclude is None else exclude[gave_up].contiguous()
        values[gave_up], indices[gave_up] = _exhaustive(S[gave_up].contiguous(), info, k, rest)
    return values, indices


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    info = snapshot(codes, S.shape[2])
    if algorithm == "prune":
        return _pruned(S, info, k, exclude, max_visits=info.n)
    return _exhaustive(S, info, k, exclude)


# recjpq.ops.pq_cross_entropy: log-sum-exp over all items and its gradient (csrc/cpu/pq_cross_entropy.cpp)
def pq_cross_entropy_forward(S, codes, scale):
    info = snapshot(codes, S.shape[2])
    return torch.ops.recjpq_cpu.pq_cross_entropy_forward(S, info.blocked, info.n, scale, simd_level())


def pq_cross_entropy_backward(S, codes, lse, grad_lse, scale):
    info = snapshot(codes, S.shape[2])
    return torch.ops.recjpq_cpu.pq_cross_entropy_backward(S, info.blocked, info.n, lse, grad_lse, scale,
                                                          simd_level())
