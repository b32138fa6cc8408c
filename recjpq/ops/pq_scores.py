from __future__ import annotations

import torch

from recjpq import backends
from recjpq._validate import check_table, check_values


@torch.library.custom_op("recjpq::pq_scores", mutates_args=())
def _pq_scores_op(S: torch.Tensor, codes: torch.Tensor, backend: str) -> torch.Tensor:
    check_values(S, codes)
    return backends.get(backend).pq_scores(S, codes)


@_pq_scores_op.register_fake
def _(S, codes, backend):
    return S.new_empty(S.shape[0], codes.shape[0])


def _setup(ctx, inputs, output):
    S, codes, _ = inputs
    ctx.save_for_backward(codes)
    ctx.num_codes = S.shape[2]


def _backward(ctx, grad):
    (codes,) = ctx.saved_tensors
    return scatter_item_grads(grad, codes, ctx.num_codes), None, None


_pq_scores_op.register_autograd(_backward, setup_context=_setup)


def scatter_item_grads(grad: torch.Tensor, codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """dS[b, m, k] = sum of grad[b, i] over items i with codes[i, m] == k."""
    batch, m = grad.shape[0], codes.shape[1]
    dS = grad.new_zeros(batch, m, num_codes)
    grad = grad.float()
    for split in range(m):
        dS[:, split].index_add_(1, codes[:, split].long(), grad)
    return dS


def pq_scores(S: torch.Tensor, codes: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Scores of every item: ``score[b, i] = sum_m S[b, m, codes[i, m]]``.

    S ``[B, M, K]`` float, codes ``[N, M]`` uint8 (K <= 256) or int16/int32 -> ``[B, N]`` float32.
    Differentiable with respect to S. It materialises B x N by definition: for the best items
    use ``pq_topk``, which never does.
    """
    check_table(S, codes)
    shape = {"B": S.shape[0], "N": codes.shape[0], "M": S.shape[1], "K": S.shape[2]}
    name = backends.resolve(backend, S.device, "pq_scores", shape)
    return _pq_scores_op(S.float().contiguous(), codes.contiguous(), name)
