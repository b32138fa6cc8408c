"""Full-softmax cross-entropy over a catalogue sharded across ranks.

With ``z = score / temperature`` the loss of a row is ``lse - (1 - eps) z_t - eps mean_i z_i``
(see ``recjpq.ops.pq_cross_entropy``). All three terms split over shards: rank r computes its
``lse_r`` (log-sum-exp over its items), ``z_t`` if it owns the target (else 0) and
``sum_{i in shard} z_i``; one all_gather of these 3 numbers per row gives every rank
``lse = logsumexp_r lse_r`` and the sums. The backward sends nothing: each rank's gradient of S
is its shard's part, and summing it over ranks gives the single-process gradient (see
``recjpq.distributed.collectives`` for where that sum happens).

The local ``lse_r`` comes from the public fused op: ``ops.pq_cross_entropy`` with
``reduction="none"`` returns ``lse_r - z[local target]`` (any local item when the target lies
elsewhere), and adding back that item's ``z`` (M gathers from S) leaves ``lse_r``; autograd
cancels the two target terms exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recjpq import ops
from recjpq.distributed.catalogue import CatalogueShard
from recjpq.distributed.collectives import all_gather_rows, gather_shares
from recjpq.ops.pq_cross_entropy import _code_counts, _target_codes, check_loss_args, reduce_losses


def _shares(S, shard: CatalogueShard, targets, valid, temperature: float, label_smoothing: float,
            backend) -> torch.Tensor:
    """``[B, 3]``: this shard's (lse_r, owned target z or 0, sum of z over the shard)."""
    scale = 1.0 / temperature
    local = targets - shard.start
    owned = valid & (local >= 0) & (local < shard.codes.shape[0])
    local = torch.where(owned, local, 0)
    rest = ops.pq_cross_entropy(S, shard.codes, torch.where(valid, local, -1), ignore_index=-1, reduction="none",
                                temperature=temperature, backend=backend)
    z_local = torch.gather(S, 2, _target_codes(shard.codes, local, valid)).sum((1, 2)) * scale
    sum_z = S.new_zeros(S.shape[0])
    if label_smoothing:
        sum_z = (S * _code_counts(shard.codes, S.shape[2]).to(S.dtype)).sum((1, 2)) * scale
    return torch.stack([rest + z_local, torch.where(owned, z_local, 0.0), sum_z], dim=1)


def _global_terms(S, shard: CatalogueShard, targets, valid, temperature: float = 1.0, label_smoothing: float = 0.0,
                  backend=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, z_t, mean_i z_i)`` per row over the whole catalogue, the same on every rank."""
    shares = gather_shares(_shares(S, shard, targets, valid, temperature, label_smoothing, backend), shard.group)
    return torch.logsumexp(shares[..., 0], dim=0), shares[..., 1].sum(0), shares[..., 2].sum(0) / shard.num_items


def _compute_dtype(S: torch.Tensor) -> torch.Tensor:
    return (S if S.dtype == torch.float64 else S.float()).contiguous()


def pq_cross_entropy(S: torch.Tensor, shard: CatalogueShard, targets: torch.Tensor, *, ignore_index: int = -100,
                     reduction: str = "mean", label_smoothing: float = 0.0, temperature: float = 1.0,
                     backend: str | None = None) -> torch.Tensor:
    """``recjpq.ops.pq_cross_entropy`` over the whole sharded catalogue (``targets`` are global ids).

    Call it on every rank of ``shard.group`` with the same S ``[B, M, K]`` and targets ``[B]``;
    every rank gets the same loss. The gradient each rank computes for S is its shard's part:
    their sum over ranks (e.g. ``all_reduce`` of ``S.grad``) is the single-process gradient.
    In data-parallel training use ``all_gather_rows`` on the rows S is computed from instead:
    its backward does that sum on the smaller ``[T, d]`` rows (see ``softmax_cross_entropy``).
    Messages: one all_gather of ``B x 3`` floats per rank; none in the backward.
    """
    if not isinstance(shard, CatalogueShard):
        raise TypeError(f"shard must be a CatalogueShard, got {type(shard).__name__}")
    check_loss_args(S, shard.codes, targets, ignore_index, reduction, label_smoothing, temperature)
    targets = targets.long()
    valid = targets != ignore_index
    kept = targets[valid]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= shard.num_items):
        raise ValueError(f"targets must be in [0, N={shard.num_items}) or equal ignore_index={ignore_index}, "
                         f"got values in [{int(kept.min())}, {int(kept.max())}]")
    eps = float(label_smoothing)
    lse, target_z, mean_z = _global_terms(_compute_dtype(S), shard, targets, valid, float(temperature), eps, backend)
    losses = torch.where(valid, lse - (1.0 - eps) * target_z - eps * mean_z, 0.0)
    return reduce_losses(losses, valid, reduction)


def softmax_cross_entropy(scorer, hidden: torch.Tensor, targets: torch.Tensor, shard: CatalogueShard) -> torch.Tensor:
    """``recjpq.models.softmax_cross_entropy`` for data-parallel training with a sharded output layer.

    ``hidden [T_r, d]`` and ``targets [T_r]`` (item ids ``1..N``) are this rank's rows; ``shard``
    shards the real items, i.e. ``codes[1:]`` (global id = item id - 1). The rows of all ranks are
    gathered, each rank scores them against its shard, and the loss is the mean over ALL rows,
    the same value on every rank. Gradients: each rank's share for every parameter it touched;
    their SUM over ranks is the gradient of the global loss (``recjpq.distributed.training``
    makes DDP sum instead of average). The padding item is a constant zero logit, as in the
    single-process loss: ``log(exp(lse) + 1) = softplus(lse)``.
    """
    if not scorer.is_pq:
        raise ValueError("a sharded output layer needs a RecJPQ (PQEmbedding) item embedding")
    rows = all_gather_rows(hidden, shard.group)
    targets = all_gather_rows(targets.long(), shard.group) - 1
    S = _compute_dtype(scorer.embedding.subitem_scores(rows))
    lse, target_z, _ = _global_terms(S, shard, targets, torch.ones_like(targets, dtype=torch.bool),
                                     backend=scorer.backend)
    return (F.softplus(lse) - target_z).mean()
