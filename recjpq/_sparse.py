"""Fixed sparse matrices multiplied with dense tables (LightGCN's graph, ``ClusterEmbedding``'s
entity-by-row incidence), as CSR: torch's CSR @ dense is the fast product on CPU and CUDA."""
from __future__ import annotations

import warnings

import torch


def csr_matrix(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The CSR tensor with ``values`` at ``(rows, cols)``, duplicates summed."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is what we need
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


class _SparseProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, a_t):
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad):
        return torch.sparse.mm(ctx.a_t, grad.contiguous()), None, None


def sparse_product(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for a fixed CSR ``a``, differentiable in ``x``: the gradient is ``a_t @ grad``
    with ``a_t`` = a's transpose, built once by the caller (``a`` itself where it is symmetric)."""
    return _SparseProduct.apply(x, a, a_t)
