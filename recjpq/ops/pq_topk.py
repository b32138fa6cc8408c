from __future__ import annotations

from typing import Optional

import torch

from recjpq import backends
from recjpq._validate import check_topk_args, check_values

ALGORITHMS = ("auto", "exhaustive", "prune")


@torch.library.custom_op("recjpq::pq_topk", mutates_args=())
def _pq_topk_op(S: torch.Tensor, codes: torch.Tensor, k: int, exclude: Optional[torch.Tensor],
                backend: str, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_values(S, codes, exclude)
    return backends.get(backend).pq_topk(S, codes, k, exclude, algorithm)


@_pq_topk_op.register_fake
def _(S, codes, k, exclude, backend, algorithm):
    return S.new_empty(S.shape[0], k), S.new_empty(S.shape[0], k, dtype=torch.int64)


def _setup(ctx, inputs, output):
    S, codes = inputs[0], inputs[1]
    ctx.save_for_backward(codes, output[1])
    ctx.num_codes = S.shape[2]


def _backward(ctx, grad_values, grad_indices):
    codes, indices = ctx.saved_tensors
    batch, k = indices.shape
    m = codes.shape[1]
    found = indices >= 0
    item_codes = codes[indices.clamp(min=0)].long()  # [B, k, M]
    flat = item_codes + torch.arange(m, device=codes.device) * ctx.num_codes
    weights = (grad_values * found).unsqueeze(-1).expand(batch, k, m)
    dS = grad_values.new_zeros(batch, m * ctx.num_codes)
    dS.scatter_add_(1, flat.reshape(batch, k * m), weights.reshape(batch, k * m).float())
    return dS.view(batch, m, ctx.num_codes), None, None, None, None, None


_pq_topk_op.register_autograd(_backward, setup_context=_setup)


def pq_topk(S: torch.Tensor, codes: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
            backend: str | None = None, algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The k best items per query without materialising the B x N scores.

    Returns ``(values [B, k] float32, descending; indices [B, k] int64)``. Ties go to the lower
    item index. ``exclude`` (int64 ``[B, E]``) lists item ids each query must skip (seen items,
    padding), ``-1`` meaning none; if fewer than k items remain, the tail is ``-inf`` with index
    ``-1``. ``algorithm``: ``"exhaustive"`` scans every item, ``"prune"`` skips items whose
    sub-item scores prove they cannot enter the top-k (exact too), ``"auto"`` lets the backend
    choose. Values are differentiable with respect to S.
    """
    check_topk_args(S, codes, k, exclude)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return run_topk(S, codes, k, exclude, backend, algorithm)


def run_topk(S, codes, k, exclude, backend, algorithm):
    """``pq_topk`` on arguments that passed ``check_topk_args``.

    Outside ``torch.compile`` and autograd the backend is called directly: the custom op only adds
    its dispatch (tens of microseconds, as long as a B = 1 scan of a few thousand items)."""
    shape = {"B": S.shape[0], "N": codes.shape[0], "M": S.shape[1], "K": S.shape[2], "k": k}
    name = backends.resolve(backend, S.device, "pq_topk", shape)
    if exclude is not None:
        exclude = exclude.contiguous()
    S, codes = S.float().contiguous(), codes.contiguous()
    if torch.compiler.is_compiling() or (S.requires_grad and torch.is_grad_enabled()):
        return _pq_topk_op(S, codes, k, exclude, name, algorithm)
    backend_module = backends.get(name)
    if not getattr(backend_module, "checks_values", False):
        check_values(S, codes, exclude)
    return backend_module.pq_topk(S, codes, k, exclude, algorithm)
