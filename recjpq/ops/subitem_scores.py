from __future__ import annotations

import threading

import torch

from recjpq._validate import FLOAT_DTYPES, check_same_device, check_tensor


def score_dtype(query: torch.Tensor, embeddings: torch.Tensor) -> torch.dtype:
    """Scores accumulate in float32 at least, whatever the inputs' precision."""
    return torch.promote_types(torch.promote_types(query.dtype, embeddings.dtype), torch.float32)


# queries per call that the C++ kernel takes (one or two: a model's top-k call). It reads the
# centroids once per query, where BLAS blocks them over the batch: measured on one AVX-512 thread
# (d = 64 / 512), it is 2.2x / 1.3x faster than torch.bmm at B = 1 and 2.1x / 2.6x slower at B = 8
CPU_KERNEL_MAX_ROWS = 2
# up to this many dimensions per split it works across sub-ids and takes every batch (csrc/cpu/pq_common.h,
# kSmallSplit): torch.bmm multiplies such thin matrices slowly
CPU_KERNEL_MAX_SPLIT = 8


def wants_grad(query: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether S must carry a gradient: the one test for the table's autograd path, its reusable
    buffer and ``pq_topk_query``'s one-call path."""
    return torch.is_grad_enabled() and (query.requires_grad or centroids.requires_grad)


def _cpu_kernel_applies(query: torch.Tensor, centroids: torch.Tensor) -> bool:
    """float32 CPU inputs outside torch.compile, with the cpu kernels built. Whether gradients are
    wanted does not matter, so a model's scores have the same bits in training and inference."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or centroids.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling():
        return False
    from recjpq.backends import cpu

    return cpu.unavailable_reason(query.device) is None


def cpu_kernel_at_any_batch(query: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether S is the C++ kernel's table whatever the batch (its values per entry do not depend
    on the rows around it), so a kernel may compute it in pieces."""
    return centroids.shape[2] <= CPU_KERNEL_MAX_SPLIT and _cpu_kernel_applies(query, centroids)


class _CpuSubitemScores(torch.autograd.Function):
    """The C++ table (forward) with its gradient in torch ops."""

    @staticmethod
    def forward(ctx, query, centroids):  # query [B, d] contiguous, centroids [M, K, d/M] contiguous
        ctx.save_for_backward(query, centroids)
        from recjpq.backends import cpu

        return torch.ops.recjpq_cpu.subitem_scores(query, centroids, cpu.simd_level())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_S):
        query, centroids = ctx.saved_tensors
        m, _, dsub = centroids.shape
        grad_query = grad_centroids = None
        if ctx.needs_input_grad[0]:
            grad_query = torch.einsum("bmk,mkd->bmd", grad_S, centroids).reshape(query.shape)
        if ctx.needs_input_grad[1]:
            grad_centroids = torch.einsum("bmk,bmd->mkd", grad_S, query.view(-1, m, dsub))
        return grad_query, grad_centroids


def subitem_scores(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The sub-item score table S: ``S[..., m, k] = query[..., m-th chunk] . centroids[m, k]``.

    ``query [B, d]`` (any leading dims are kept), ``centroids [M, K, d // M]`` -> S ``[B, M, K]``
    float32. It is the only place the query meets the sub-item embeddings, so autograd flows
    through it to both.
    """
    check_subitem_args(query, centroids)
    return scores_table(query, centroids)


def check_subitem_args(query: torch.Tensor, centroids: torch.Tensor) -> None:
    check_tensor("query", query, dtypes=FLOAT_DTYPES)
    check_tensor("centroids", centroids, ndim=3, dtypes=FLOAT_DTYPES)
    check_same_device(query=query, centroids=centroids)
    if query.dim() < 1:
        raise ValueError("query must have shape [B, d]")
    m, _, dsub = centroids.shape
    d = query.shape[-1]
    if d % m != 0:
        raise ValueError(f"query dim d={d} is not divisible by M={m} splits of centroids")
    if d // m != dsub:
        raise ValueError(f"centroids have sub-dimension {dsub} but query dim d={d} with M={m} needs {d // m}")


_scratch = threading.local()
_SCRATCH_MAX_NUMEL = 1 << 22  # 16 MB per buffer and thread at most; larger tables are allocated per call


def _scratch_buffer(slot: int, numel: int) -> torch.Tensor:
    """A float32 buffer of this thread, reused across calls. A fresh multi-MB tensor costs a page
    fault per 4 KB page on every call: at B = 64, M = 32 the table's two allocations took 1.7 ms of
    a 3.1 ms top-k call on this VM (both tables 2 MB)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[slot] = torch.empty(numel)
    return buffer[:numel]


def scores_table(query: torch.Tensor, centroids: torch.Tensor, *, scratch: bool = False) -> torch.Tensor:
    """``subitem_scores`` on arguments that passed ``check_subitem_args``. ``scratch=True``: the
    table may live in this thread's reusable buffer (contiguous), for callers that neither return
    it nor keep it past their call, outside autograd."""
    m, num_codes, dsub = centroids.shape
    rows = query.numel() // (m * dsub) if m * dsub else 0
    # one or two queries: no BLAS parallel region to stall on a busy machine (csrc/cpu/subitem_scores.cpp)
    if (rows <= CPU_KERNEL_MAX_ROWS and _cpu_kernel_applies(query, centroids)) or cpu_kernel_at_any_batch(query,
                                                                                                         centroids):
        flat, table = query.reshape(-1, m * dsub).contiguous(), centroids.contiguous()
        if wants_grad(query, centroids):
            S = _CpuSubitemScores.apply(flat, table)
        else:  # the autograd.Function's bookkeeping costs as much as a B = 1 table
            from recjpq.backends import cpu

            S = torch.ops.recjpq_cpu.subitem_scores(flat, table, cpu.simd_level())
        return S.view(*query.shape[:-1], m, num_codes)
    dtype = score_dtype(query, centroids)
    # the batched matmul einsum("...md,mkd->...mk") runs, without its parsing (a third of a B = 1 call)
    chunks = query.reshape(-1, m, dsub).transpose(0, 1).to(dtype)  # [M, B', d/M]
    columns = centroids.to(dtype).transpose(1, 2)  # [M, d/M, K]
    numel = rows * m * num_codes
    if (scratch and dtype == torch.float32 and query.device.type == "cpu" and numel <= _SCRATCH_MAX_NUMEL
            and not torch.compiler.is_compiling()):
        by_split = torch.bmm(chunks, columns, out=_scratch_buffer(0, numel).view(m, rows, num_codes))
        S = _scratch_buffer(1, numel).view(rows, m, num_codes).copy_(by_split.transpose(0, 1))
        return S.view(*query.shape[:-1], m, num_codes)
    S = torch.bmm(chunks, columns).transpose(0, 1)  # [B', M, K]
    return S.reshape(*query.shape[:-1], m, num_codes).float()
