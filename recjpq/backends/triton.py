"""Triton backend: fused PQ scoring and top-k (kernels in ``recjpq.kernels``) for CUDA tensors.

``pq_topk`` never materialises B x N: stage 1 keeps each (item range, query) pair's best
``next_pow2(k)`` packed keys, stage 2 is one ``torch.topk`` over them. CPU tensors run only
under ``TRITON_INTERPRET=1`` (the interpreter, for tests), which must be set before
``recjpq.kernels`` is first imported, since ``@triton.jit`` reads it then.
"""
from __future__ import annotations

import torch
import triton

from recjpq._codes_cache import codes_info
from recjpq.backends import reference
from recjpq.kernels.pq_lookup import INTERPRETED
from recjpq.kernels.pq_scores import pq_scores_kernel
from recjpq.kernels.pq_topk import pq_topk_kernel
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


def _codes_split_major(codes: torch.Tensor) -> torch.Tensor:
    """The ``[M, N]`` copy of the codes that the kernels read, made once per codes tensor."""
    prepared = codes_info(codes).prepared
    if "triton" not in prepared:
        prepared["triton"] = codes.t().contiguous()
    return prepared["triton"]


def _num_splits(n: int, batch: int, device: torch.device) -> int:
    """Item ranges per query group: enough programs to fill the device, few candidates to merge."""
    if device.type == "cuda":
        programs, min_items = 32 * torch.cuda.get_device_properties(device).multi_processor_count, 8192
    else:  # the interpreter: several ranges, so tests cover the merge
        programs, min_items = 8, 128
    return max(1, min(triton.cdiv(n, min_items), triton.cdiv(programs, batch)))


def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    batch, m, num_codes = S.shape
    n = codes.shape[0]
    out = torch.empty(batch, n, dtype=torch.float32, device=S.device)
    grid = lambda meta: (triton.cdiv(batch, meta["QB"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    pq_scores_kernel[grid](S, _codes_split_major(codes), out, batch, n, _bucket(batch), M=m, K=num_codes)
    return out


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    del algorithm  # one exact scan; its running threshold already skips most selection work
    if k > MAX_FUSED_K:
        return reference.pq_topk(S, codes, k, exclude)
    batch, m, num_codes = S.shape
    n = codes.shape[0]
    kt = triton.next_power_of_2(k)
    splits = _num_splits(n, batch, S.device)
    cand = torch.empty(batch, splits, kt, dtype=torch.int64, device=S.device)
    if exclude is not None and exclude.shape[1] > 0:
        exclude_sorted, width = torch.sort(exclude, dim=1).values, exclude.shape[1]
    else:
        exclude_sorted, width = cand, 0  # never read: EXCLUDE_STEPS = 0 compiles the lookup out
    grid = lambda meta: (splits * triton.cdiv(batch, meta["QB"]),)
    pq_topk_kernel[grid](S, _codes_split_major(codes), exclude_sorted, cand, batch, n, width, splits,
                         _bucket(batch), M=m, K=num_codes, KT=kt, EXCLUDE_STEPS=width.bit_length())
    return unpack_keys(torch.topk(cand.view(batch, -1), k, dim=1).values)


# recjpq.ops.pq_cross_entropy: log-sum-exp over all items and its gradient (kernels/pq_cross_entropy.py)
from recjpq.kernels.pq_cross_entropy import pq_logsumexp, pq_logsumexp_backward  # noqa: E402


def pq_cross_entropy_forward(S, codes, scale):
    return pq_logsumexp(S, _codes_split_major(codes), scale, _num_splits(codes.shape[0], S.shape[0], S.device))


def pq_cross_entropy_backward(S, codes, lse, grad_lse, scale):
    return pq_logsumexp_backward(S, _codes_split_major(codes), lse, grad_lse, scale,
                                 _num_splits(codes.shape[0], S.shape[0], S.device))


# recjpq.ops.pq_topk_query, algorithm "decode*": tensor-core scores of decoded items, exact rescoring
# of the candidates within a proven margin (kernels/pq_decode_topk.py)
from recjpq.kernels.pq_decode_topk import MAX_DECODE_K, pq_decode_topk  # noqa: E402


def pq_topk_query(query, centroids, S, codes, k, exclude, algorithm):
    if k > MAX_DECODE_K:
        return pq_topk(S, codes, k, exclude)
    lut = lambda S_rows, exclude_rows: pq_topk(S_rows, codes, k, exclude_rows)
    splits = _num_splits(codes.shape[0], triton.cdiv(query.shape[0], 16), S.device)
    return pq_decode_topk(query, centroids, S, _codes_split_major(codes), k, exclude, splits, algorithm, lut)
