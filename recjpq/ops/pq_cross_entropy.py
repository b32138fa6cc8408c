"""Full-softmax cross-entropy over a PQ item catalogue without the B x N logits.

With ``z = score / temperature``, ``lse_b = log sum_i exp(z[b, i])`` and smoothing ``eps``:

    loss_b = lse_b - (1 - eps) * z[b, t_b] - eps * mean_i z[b, i]

which is ``F.cross_entropy(pq_scores(S, codes) / temperature, targets, label_smoothing=eps)``
row by row. Only ``lse`` and its gradient (each item's softmax probability, added to the sub-ids
it is made of) touch every item; the backends compute them tile by tile in O(B x M x K) memory.
The target term reads one item per row and the smoothing term is linear in S through the
per-split code counts, so both are computed here, once for every backend.
"""
from __future__ import annotations

import torch

from recjpq import backends
from recjpq._codes_cache import codes_info
from recjpq._validate import check_same_device, check_table, check_tensor, check_values

REDUCTIONS = ("none", "mean", "sum")
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _code_counts(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``counts[m, k]``: how many items have ``codes[i, m] == k``, cached per codes tensor."""
    prepared = codes_info(codes).prepared
    key = ("pq_cross_entropy.code_counts", num_codes)
    if key not in prepared:
        m = codes.shape[1]
        flat = codes.long() + torch.arange(m, device=codes.device) * num_codes
        prepared[key] = torch.bincount(flat.flatten(), minlength=m * num_codes).view(m, num_codes)
    return prepared[key]


def _target_codes(codes: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, M, 1]`` sub-ids of each row's target (item 0 on ignored rows, whose terms are zeroed)."""
    return codes[torch.where(valid, targets, 0)].long().unsqueeze(2)


def check_loss_args(S: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor, ignore_index, reduction,
                    label_smoothing, temperature) -> None:
    """The metadata checks of ``pq_cross_entropy`` (shared with its sharded form in
    ``recjpq.distributed``); the target range is checked by each against its own N."""
    check_table(S, codes)
    check_tensor("targets", targets, ndim=1, dtypes=TARGET_DTYPES)
    check_same_device(S=S, targets=targets)
    if targets.shape[0] != S.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows but S has B={S.shape[0]} rows")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def reduce_losses(losses: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses (0 where ignored) -> the requested reduction; "mean" is over the valid rows."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()


def _rows_to_run(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows the backend must process, or None when it is all of them."""
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


@torch.library.custom_op("recjpq::pq_cross_entropy", mutates_args=())
def _pq_cross_entropy_op(S: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         label_smoothing: float, temperature: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (0 on ignored rows) and the ``lse`` the backward pass reuses (0 on ignored rows)."""
    check_values(S, codes)
    valid = targets != ignore_index
    n = codes.shape[0]
    kept = targets[valid]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n):
        raise ValueError(f"targets must be in [0, N={n}) or equal ignore_index={ignore_index}, got values in "
                         f"[{int(kept.min())}, {int(kept.max())}]")
    scale = 1.0 / temperature
    rows = _rows_to_run(valid)
    lse = S.new_zeros(S.shape[0])
    if rows is None:
        lse = backends.get(backend).pq_cross_entropy_forward(S, codes, scale)
    elif rows.numel():
        lse.index_copy_(0, rows, backends.get(backend).pq_cross_entropy_forward(S.index_select(0, rows), codes, scale))
    target_z = torch.gather(S, 2, _target_codes(codes, targets, valid)).sum((1, 2)) * scale
    losses = lse - (1.0 - label_smoothing) * target_z
    if label_smoothing:
        counts = _code_counts(codes, S.shape[2]).to(S.dtype)
        losses = losses - label_smoothing * scale / n * (S * counts).sum((1, 2))
    return torch.where(valid, losses, 0.0), lse


@_pq_cross_entropy_op.register_fake
def _(S, codes, targets, ignore_index, label_smoothing, temperature, backend):
    return S.new_empty(S.shape[0]), S.new_empty(S.shape[0])


@torch.library.custom_op("recjpq::pq_cross_entropy_backward", mutates_args=())
def _pq_cross_entropy_backward_op(grad_losses: torch.Tensor, S: torch.Tensor, codes: torch.Tensor,
                                  targets: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                                  label_smoothing: float, temperature: float, backend: str) -> torch.Tensor:
    valid = targets != ignore_index
    grad = torch.where(valid, grad_losses.to(S.dtype), 0.0)
    scale = 1.0 / temperature
    rows = _rows_to_run(grad != 0)
    if rows is None:
        dS = backends.get(backend).pq_cross_entropy_backward(S, codes, lse, grad, scale)
    else:
        dS = torch.zeros_like(S)
        if rows.numel():
            dS.index_copy_(0, rows, backends.get(backend).pq_cross_entropy_backward(
                S.index_select(0, rows), codes, lse.index_select(0, rows), grad.index_select(0, rows), scale))
    target_grad = (-(1.0 - label_smoothing) * scale) * grad
    dS.scatter_add_(2, _target_codes(codes, targets, valid), target_grad.view(-1, 1, 1).expand(-1, S.shape[1], 1))
    if label_smoothing:
        counts = _code_counts(codes, S.shape[2]).to(S.dtype)
        dS -= (label_smoothing * scale / codes.shape[0]) * grad.view(-1, 1, 1) * counts
    return dS


@_pq_cross_entropy_backward_op.register_fake
def _(grad_losses, S, codes, targets, lse, ignore_index, label_smoothing, temperature, backend):
    return torch.empty_like(S)


def _setup(ctx, inputs, output):
    S, codes, targets, ignore_index, label_smoothing, temperature, backend = inputs
    ctx.save_for_backward(S, codes, targets, output[1])
    ctx.args = (ignore_index, label_smoothing, temperature, backend)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_losses, grad_lse):
    del grad_lse  # lse is internal: pq_cross_entropy never returns it
    S, codes, targets, lse = ctx.saved_tensors
    dS = _pq_cross_entropy_backward_op(grad_losses, S, codes, targets, lse, *ctx.args)
    return dS, None, None, None, None, None, None


_pq_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


def pq_cross_entropy(S: torch.Tensor, codes: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                     reduction: str = "mean", label_smoothing: float = 0.0, temperature: float = 1.0,
                     backend: str | None = None) -> torch.Tensor:
    """Full-softmax cross-entropy over all N items, without the ``[B, N]`` logits.

    Equals ``F.cross_entropy(pq_scores(S, codes) / temperature, targets, ignore_index=...,
    reduction=..., label_smoothing=...)`` but needs O(B x M x K) memory: the backends compute a
    running log-sum-exp over item tiles, and the backward pass recomputes the scores tile by tile.
    S ``[B, M, K]`` float, codes ``[N, M]``, targets ``[B]`` integer item ids (rows equal to
    ``ignore_index`` add nothing and are skipped). ``reduction="mean"`` averages over the rows not
    ignored (nan if there are none). Computes in float32, or float64 for float64 S; differentiable
    with respect to S.
    """
    check_loss_args(S, codes, targets, ignore_index, reduction, label_smoothing, temperature)
    name = backends.resolve(backend, S.device, "pq_cross_entropy_forward")
    S = (S if S.dtype == torch.float64 else S.float()).contiguous()
    losses, _ = _pq_cross_entropy_op(S, codes.contiguous(), targets.long().contiguous(), ignore_index,
                                     float(label_smoothing), float(temperature), name)
    return reduce_losses(losses, targets != ignore_index, reduction)
