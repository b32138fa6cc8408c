"""The "cpu" backend: fused C++ kernels (``recjpq._C``, ops ``torch.ops.recjpq_cpu.*``).

Codes are re-laid out once per codes tensor into blocks of 64 items stored split-major (cached in
``codes_info(codes).prepared``), which the AVX-512 / AVX2 / scalar scorers read as whole registers.
``RECJPQ_CPU_SIMD=scalar|avx2|avx512`` forces one SIMD path (default: the best the CPU has).

``algorithm="prune"`` walks an inverted index from the best sub-ids down and stops when no unseen
item can reach the k-th score (exact). ``"auto"`` scans exhaustively: measured on a 2-core AVX-512
machine (docs/cpu-kernel.md), pruning is 4.5x slower on random S and at best ~2.5x faster per core
on strongly peaked S, while the exhaustive scan uses every core even for one query.
"""
from __future__ import annotations

import os

import torch

from recjpq._codes_cache import codes_info

try:
    import recjpq._C  # noqa: F401  (loads the recjpq_cpu ops)
    _IMPORT_ERROR = None
except ImportError as e:  # built without extensions (RECJPQ_NO_EXT=1) or a broken build
    _IMPORT_ERROR = e

SIMD_ENV = "RECJPQ_CPU_SIMD"
SIMD_LEVELS = ("auto", "scalar", "avx2", "avx512")


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "it runs on CPU tensors only"
    if _IMPORT_ERROR is not None:
        return f"the compiled extension recjpq._C is missing ({_IMPORT_ERROR})"
    return None


def simd_level() -> str:
    """The SIMD path the kernels will take: ``RECJPQ_CPU_SIMD`` if set, else the best supported."""
    level = os.environ.get(SIMD_ENV, "auto") or "auto"
    if level not in SIMD_LEVELS:
        raise ValueError(f"{SIMD_ENV} must be one of {SIMD_LEVELS}, got {level!r}")
    if level != "auto" and not torch.ops.recjpq_cpu.simd_supported(level):
        raise RuntimeError(f"{SIMD_ENV}={level} forces a SIMD path this CPU (or build) does not support")
    return torch.ops.recjpq_cpu.simd_resolved(level)


def simd_supported(level: str) -> bool:
    return bool(torch.ops.recjpq_cpu.simd_supported(level))


def _prepared(codes: torch.Tensor, name, build):
    cache = codes_info(codes).prepared
    if name not in cache:
        cache[name] = build()
    return cache[name]


def blocked_codes(codes: torch.Tensor) -> torch.Tensor:
    """The scan layout ``[ceil(N / 64), M, 64]`` of ``codes``, built once per codes tensor."""
    return _prepared(codes, "cpu_blocked", lambda: torch.ops.recjpq_cpu.block_codes(codes))


def inverted_index(codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets [M, K + 1], items [M * N])``: per split, the items holding each sub-id."""
    return _prepared(codes, ("cpu_inverted", num_codes),
                     lambda: torch.ops.recjpq_cpu.inverted_index(codes, num_codes))


def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.recjpq_cpu.pq_scores(S, blocked_codes(codes), codes.shape[0], simd_level())


def _exhaustive(S, codes, k, exclude):
    return torch.ops.recjpq_cpu.pq_topk(S, blocked_codes(codes), codes.shape[0], k, exclude, simd_level())


def _pruned(S, codes, k, exclude, max_visits):
    """Pruned top-k; queries that score ``max_visits`` items without proving their top-k are rescanned."""
    offsets, items = inverted_index(codes, S.shape[2])
    values, indices, visited = torch.ops.recjpq_cpu.pq_topk_prune(S, codes, offsets, items, k, exclude, max_visits)
    gave_up = (visited < 0).nonzero().flatten()
    if gave_up.numel():
        rest = None if exclude is None else exclude[gave_up].contiguous()
        values[gave_up], indices[gave_up] = _exhaustive(S[gave_up].contiguous(), codes, k, rest)
    return values, indices


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    if algorithm == "prune":
        return _pruned(S, codes, k, exclude, max_visits=codes.shape[0])
    return _exhaustive(S, codes, k, exclude)


# recjpq.ops.pq_cross_entropy: log-sum-exp over all items and its gradient (csrc/cpu/pq_cross_entropy.cpp)
def pq_cross_entropy_forward(S, codes, scale):
    return torch.ops.recjpq_cpu.pq_cross_entropy_forward(S, blocked_codes(codes), codes.shape[0], scale, simd_level())


def pq_cross_entropy_backward(S, codes, lse, grad_lse, scale):
    return torch.ops.recjpq_cpu.pq_cross_entropy_backward(S, blocked_codes(codes), codes.shape[0], lse, grad_lse,
                                                          scale, simd_level())
