from __future__ import annotations

import torch

from recjpq._validate import FLOAT_DTYPES, check_same_device, check_tensor


def score_dtype(query: torch.Tensor, embeddings: torch.Tensor) -> torch.dtype:
    """Scores accumulate in float32 at least, whatever the inputs' precision."""
    return torch.promote_types(torch.promote_types(query.dtype, embeddings.dtype), torch.float32)


def _cpu_inference(query: torch.Tensor, centroids: torch.Tensor) -> bool:
    """float32 CPU inputs that need no gradient, outside torch.compile, with the cpu kernels built."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or centroids.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or centroids.requires_grad):
        return False
    if torch.compiler.is_compiling():
        return False
    from recjpq.backends import cpu

    return cpu.unavailable_reason(query.device) is None


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


def scores_table(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``subitem_scores`` on arguments that passed ``check_subitem_args``."""
    m, num_codes, dsub = centroids.shape
    if _cpu_inference(query, centroids):  # no BLAS parallel region: see csrc/cpu/subitem_scores.cpp
        S = torch.ops.recjpq_cpu.subitem_scores(query.reshape(-1, m * dsub).contiguous(), centroids.contiguous())
        return S.view(*query.shape[:-1], m, num_codes)
    dtype = score_dtype(query, centroids)
    # the batched matmul einsum("...md,mkd->...mk") runs, without its parsing (a third of a B = 1 call)
    chunks = query.reshape(-1, m, dsub).transpose(0, 1).to(dtype)  # [M, B', d/M]
    S = torch.bmm(chunks, centroids.to(dtype).transpose(1, 2)).transpose(0, 1)  # [B', M, K]
    return S.reshape(*query.shape[:-1], m, num_codes).float()
