"""Triton backend: fused PQ scoring and top-k (kernels in ``recjpq.kernels``) for CUDA tensors.

``pq_topk`` never materialises B x N: stage 1 keeps each (item range, query) pair's best
``next_pow2(k)`` packed keys, stage 2 is one ``torch.topk`` over them. CPU tensors run only
under ``TRITON_INTERPRET=1`` (the interpreter, for tests), which must be set before
``recjpq.kernels`` is first imported, since ``@triton.jit`` reads it then.
"""
from __future__ import annotations

import functools

import torch
import triton

from recjpq._codes_cache import codes_info
from recjpq.backends import reference
from recjpq.kernels.pq_lookup import INTERPRETED
from recjpq.kernels.pq_scores import pq_scores_kernel
from recjpq.kernels.pq_topk import key_slots, pq_topk_kernel
from recjpq.topk_keys import unpack_keys

# Larger k would need a per-program key buffer beyond registers; the reference's chunked scan
# (same semantics, PyTorch on the same device) serves it instead.
MAX_FUSED_K = 1024


def unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if INTERPRETED:
            return "TRITON_INTERPRET=1 was set when recjpq.kernels was imported, so kernels only run on CPU"
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return "Triton kernels run on CPU tensors only under the interpreter (TRITON_INTERPRET=1 set before import)"
    return f"Triton kernels do not run on {device.type} tensors"


def _bucket(batch: int) -> int:
    """Autotuning key for the batch: powers of two up to 1024."""
    return min(triton.next_power_of_2(batch), 1024)


def codes_stride(n: int) -> int:
    """Row stride of the split-major codes copy: ``n`` rounded up to 16 codes, so every row starts
    16-byte aligned whatever the code width and Triton vectorises the loads (pq_lookup.load_codes)."""
    return triton.cdiv(n, 16) * 16


def _codes_split_major(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """The padded ``[M, codes_stride(N)]`` copy of the codes that the kernels read, made once per
    codes tensor. Its range is checked on the copy itself, so the kernels read only codes that
    were validated in the snapshot they scan (padding holds code 0, never a real item's)."""
    info = codes_info(codes)
    copy = info.prepared.get("triton")
    if copy is None:
        n, m = codes.shape
        copy = torch.zeros(m, codes_stride(n), dtype=codes.dtype, device=codes.device)
        copy[:, :n] = codes.t()
        lo, hi = (int(v) for v in copy[:, :n].aminmax())
        info.prepared["triton"] = copy = (copy, lo, hi)
    copy, lo, hi = copy
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"codes must lie in [0, K={num_codes}), got values in [{lo}, {hi}]")
    return copy


# Stage 1's grid: at least this many programs per SM, each scanning at least _MIN_SPLIT_ITEMS
# items (B = 1, N = 1.27M on an H100: 528 programs of 2,409 items), with at most N / 8 keys per
# query for stage 2 to merge whatever k is. Predicted from the SASS, not yet timed on a GPU.
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_ITEMS = 2048
_WIDEST_QUERY_GROUP = 4  # the largest QB of any config


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(n: int, batch: int, programs: int, min_items: int = _MIN_SPLIT_ITEMS, kt: int | None = None) -> int:
    """Item ranges per query group: about ``programs`` programs in all (counting query groups of
    the widest config), ranges of at least ``min_items``, and ``splits * kt <= N / 8``."""
    splits = min(triton.cdiv(programs, triton.cdiv(batch, _WIDEST_QUERY_GROUP)), triton.cdiv(n, min_items))
    if kt is not None:
        splits = min(splits, n // (8 * kt))
    return max(1, splits)


def _num_splits(n: int, batch: int, device: torch.device, kt: int | None = None) -> int:
    if device.type == "cuda":
        return num_splits(n, batch, _PROGRAMS_PER_SM * _sm_count(device), kt=kt)
    return num_splits(n, batch, 8, 128, kt)  # the interpreter: several ranges, so tests cover the merge


def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    S = S.contiguous()  # the kernels index S as a dense [B, M, K]
    batch, m, num_codes = S.shape
    n = codes.shape[0]
    codes_t = _codes_split_major(codes, num_codes)
    out = torch.empty(batch, n, dtype=torch.float32, device=S.device)
    grid = lambda meta: (triton.cdiv(batch, meta["QB"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    pq_scores_kernel[grid](S, codes_t, codes_t.stride(0), out, batch, n, _bucket(batch), M=m, K=num_codes)
    return out


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    del algorithm  # one exact scan; its running threshold already skips most selection work
    if k > MAX_FUSED_K:
        return reference.pq_topk(S, codes, k, exclude)
    S = S.contiguous()  # e.g. subitem_scores' S in pq_topk_query; the kernels index a dense [B, M, K]
    batch, m, num_codes = S.shape
    n = codes.shape[0]
    kt = key_slots(k)
    codes_t = _codes_split_major(codes, num_codes)
    splits = _num_splits(n, batch, S.device, kt)
    cand = torch.empty(batch, splits, kt, dtype=torch.int64, device=S.device)
    if exclude is not None and exclude.shape[1] > 0:
        exclude_sorted, width = torch.sort(exclude, dim=1).values, exclude.shape[1]
    else:
        exclude_sorted, width = cand, 0  # never read: EXCLUDE_STEPS = 0 compiles the lookup out
    grid = lambda meta: (splits * triton.cdiv(batch, meta["QB"]),)
    pq_topk_kernel[grid](S, codes_t, codes_t.stride(0), exclude_sorted, cand, batch, n, width, splits,
                         _bucket(batch), M=m, K=num_codes, KT=kt, EXCLUDE_STEPS=width.bit_length())
    return unpack_keys(torch.topk(cand.view(batch, -1), k, dim=1).values)


# recjpq.ops.pq_cross_entropy: log-sum-exp over all items and its gradient (kernels/pq_cross_entropy.py)
from recjpq.kernels.pq_cross_entropy import pq_logsumexp, pq_logsumexp_backward  # noqa: E402


def pq_cross_entropy_forward(S, codes, scale):
    n = codes.shape[0]
    return pq_logsumexp(S, _codes_split_major(codes, S.shape[2]), n, scale, _num_splits(n, S.shape[0], S.device))


def pq_cross_entropy_backward(S, codes, lse, grad_lse, scale):
    """Bitwise reproducible (no float atomics) under ``torch.use_deterministic_algorithms(True)``."""
    n = codes.shape[0]
    return pq_logsumexp_backward(S, _codes_split_major(codes, S.shape[2]), n, lse, grad_lse, scale,
                                 _num_splits(n, S.shape[0], S.device),
                                 deterministic=torch.are_deterministic_algorithms_enabled())


# recjpq.ops.pq_topk_query, algorithm "decode*": tensor-core scores of decoded items, exact rescoring
# of the candidates within a proven margin (kernels/pq_decode_topk.py)
from recjpq.kernels.pq_decode_topk import MAX_DECODE_K, MAX_DECODE_K_EXCLUDING, pq_decode_topk  # noqa: E402


def pq_topk_query(query, centroids, S, codes, k, exclude, algorithm):
    excluding = exclude is not None and exclude.shape[1] > 0
    if k > (MAX_DECODE_K_EXCLUDING if excluding else MAX_DECODE_K):
        return pq_topk(S, codes, k, exclude)
    lut = lambda S_rows, exclude_rows: pq_topk(S_rows, codes, k, exclude_rows)
    n = codes.shape[0]
    splits = _num_splits(n, triton.cdiv(query.shape[0], 16), S.device, key_slots(k))
    return pq_decode_topk(query, centroids, S, _codes_split_major(codes, S.shape[2]), n, k, exclude, splits,
                          algorithm, lut)
