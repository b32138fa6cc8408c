"""Top-k straight from the queries and the PQ catalogue: ``pq_topk(subitem_scores(query,
centroids), codes, k)``, with the sub-item embeddings at hand so that a backend may score on the
tensor cores (decode items, ``tl.dot`` with the queries) and rescore its candidates exactly."""
from __future__ import annotations

from typing import Optional

import torch

from recjpq import backends
from recjpq._validate import (CODE_DTYPES, FLOAT_DTYPES, check_codes, check_k_exclude, check_same_device,
                              check_tensor, check_values)
from recjpq.ops import _decoded
from recjpq.ops.pq_topk import _backward as _pq_topk_backward, _setup as _pq_topk_setup, run_topk
from recjpq.ops.subitem_scores import (CPU_KERNEL_MAX_ROWS, check_subitem_args, cpu_kernel_at_any_batch, scores_table,
                                      wants_grad)

# "decode*" differ in the tensor-core input precision (kernels/pq_decode_topk.py: DECODE_ALGORITHMS)
ALGORITHMS = ("auto", "lut", "matmul", "decode", "decode_tf32x3", "decode_bf16")


@torch.library.custom_op("recjpq::pq_topk_query", mutates_args=())
def _pq_topk_query_op(S: torch.Tensor, codes: torch.Tensor, k: int, exclude: Optional[torch.Tensor],
                      query: torch.Tensor, centroids: torch.Tensor, backend: str,
                      algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_values(S, codes, exclude)
    return backends.get(backend).pq_topk_query(query, centroids, S, codes, k, exclude, algorithm)


@_pq_topk_query_op.register_fake
def _(S, codes, k, exclude, query, centroids, backend, algorithm):
    return S.new_empty(S.shape[0], k), S.new_empty(S.shape[0], k, dtype=torch.int64)


def _backward(ctx, grad_values, grad_indices):
    """pq_topk's: the values are S sums, so gradients reach query and centroids through S."""
    return _pq_topk_backward(ctx, grad_values, grad_indices) + (None, None)


_pq_topk_query_op.register_autograd(_backward, setup_context=_pq_topk_setup)


# queries per call that go through one C++ call (the Python it saves is 25-40 us, a third of a
# B = 8 call at N = 3,417)
ONE_CALL_MAX_ROWS = 64


def _small_cpu_call(query, centroids, codes, k, exclude, algorithm):
    """The general path's result from one C++ call, for the calls a model makes at inference (a few
    CPU queries, no gradient wanted); None for anything else, or anything it does not vouch for,
    which the general path then handles (its errors included). ``algorithm``: "auto", "lut" or
    "matmul"."""
    if not (isinstance(query, torch.Tensor) and isinstance(centroids, torch.Tensor) and isinstance(codes, torch.Tensor)
            and (exclude is None or isinstance(exclude, torch.Tensor)) and type(k) is int):
        return None
    if (not query.is_cpu or query.dim() != 2 or query.shape[0] > ONE_CALL_MAX_ROWS or centroids.dim() != 3
            or codes.dim() != 2 or not codes.is_cpu or codes.dtype not in CODE_DTYPES
            or (codes.dtype == torch.uint8 and centroids.shape[1] > 256)):
        return None
    if wants_grad(query, centroids) or torch.compiler.is_compiling():
        return None
    from recjpq.backends import cpu

    decoded = None
    if algorithm == "matmul" or (algorithm == "auto" and _decoded.prefers_matmul(
            query.shape[0], codes.shape[0], query.shape[1], codes.shape[1], k)):
        if (_decoded.unavailable_reason(query.device) is not None or codes.shape[1] == 0
                or centroids.shape[0] != codes.shape[1] or not 0 < k <= codes.shape[0]):
            return None if algorithm == "matmul" else cpu.topk_query_small(query, centroids, codes, k, exclude,
                                                                          CPU_KERNEL_MAX_ROWS)
        try:  # the snapshot it decodes is range-checked: no separate check of the codes here
            decoded = _decoded.decoded_table(codes, centroids)
        except ValueError:
            return None  # codes out of range: the general path raises the error
    return cpu.topk_query_small(query, centroids, codes, k, exclude, CPU_KERNEL_MAX_ROWS, decoded)


def pq_topk_query(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, k: int, *,
                  exclude: torch.Tensor | None = None, backend: str | None = None,
                  algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items for queries ``[B, d]`` over the catalogue ``(centroids [M, K, d/M], codes [N, M])``.

    Exactly ``pq_topk(subitem_scores(query, centroids), codes, k, exclude=exclude)``: the same
    float32 values (splits added in order) and indices, ties to the lower index, a ``-inf`` / ``-1``
    tail when fewer than k items remain. ``algorithm``: ``"lut"`` builds S and runs ``pq_topk`` on
    ``backend``; ``"matmul"`` (CPU tensors) multiplies the queries with the decoded ``[N, d]`` item
    table, decoded once and cached until codes or centroids change, then rescores the candidates
    within a proven error margin of the k-th best exactly from S (``recjpq.ops._decoded``);
    ``"decode"`` (triton only: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) scores tiles of
    decoded items against blocks of queries with ``tl.dot`` in tf32 and rescores the same way
    (``"decode_tf32x3"`` and ``"decode_bf16"``: other input precisions, tighter or looser margins).
    ``"auto"`` (with ``backend=None``) is ``"matmul"`` on CPU where the measured shape grid says it
    wins (``_decoded.prefers_matmul``; docs/cpu-kernel.md), else ``"lut"``. Values are
    differentiable with respect to ``query`` and ``centroids`` (through S).
    """
    if backend is None and algorithm in ("auto", "lut", "matmul"):
        result = _small_cpu_call(query, centroids, codes, k, exclude, algorithm)
        if result is not None:
            return result
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    decode = algorithm.startswith("decode")
    if decode and backend not in (None, "triton"):
        raise ValueError(f"algorithm={algorithm!r} runs only on the triton backend, got backend={backend!r}")
    check_tensor("query", query, ndim=2, dtypes=FLOAT_DTYPES)
    check_subitem_args(query, centroids)
    check_codes(codes, centroids.shape[1])
    check_same_device(query=query, centroids=centroids, codes=codes, exclude=exclude)
    if centroids.shape[0] != codes.shape[1]:
        raise ValueError(f"centroids have M={centroids.shape[0]} splits but codes have M={codes.shape[1]}")
    if query.shape[0] == 0 or centroids.shape[1] == 0:
        raise ValueError(f"need B >= 1 queries and K >= 1 sub-ids, got query {tuple(query.shape)}, "
                         f"centroids {tuple(centroids.shape)}")
    if algorithm == "matmul":
        reason = _decoded.unavailable_reason(query.device)
        if reason is not None:
            raise ValueError(f"algorithm='matmul' cannot run: {reason}")
    check_k_exclude(k, codes.shape[0], exclude, query)  # S will have the queries' rows and device
    if (algorithm == "auto" and backend is None and _decoded.prefers_matmul(query.shape[0], codes.shape[0],
                                                                             query.shape[1], codes.shape[1], k)
            and _decoded.unavailable_reason(query.device) is None):
        algorithm = "matmul"
    grad = wants_grad(query, centroids)
    if algorithm == "matmul" and not torch.compiler.is_compiling():
        if exclude is not None:
            exclude = exclude.contiguous()
        # the kernel computes S itself, a chunk of queries at a time, where it is the C++ table
        S = None if not grad and cpu_kernel_at_any_batch(query, centroids) else scores_table(query, centroids)
        return _decoded.matmul_topk(query, centroids, S, codes.contiguous(), k, exclude)
    # S stays inside this call (the backends return new tensors), so outside autograd it may live
    # in a reused buffer: fresh tables of a few MB cost more in page faults than the scan
    S = scores_table(query, centroids, scratch=not grad)
    if not decode:  # "lut"; "matmul" under torch.compile (data-dependent fallback), which gives the same result
        return run_topk(S, codes, k, exclude, backend, "auto")
    name = backends.resolve("triton", S.device, "pq_topk_query")
    if exclude is not None:
        exclude = exclude.contiguous()
    return _pq_topk_query_op(S, codes.contiguous(), k, exclude, query.contiguous(), centroids.contiguous(),
                             name, algorithm)
