"""Autograd-aware collectives for data-parallel rows meeting a sharded catalogue.

Two ways a tensor becomes replicated, and where each puts the gradient's sum over ranks:

- ``all_gather_rows``: every rank's rows, concatenated. Each rank then computes something for
  ALL rows from its own shard only, so the gradient of the gathered rows differs per rank; the
  backward sums it over ranks (all_reduce) and keeps this rank's rows.
- ``gather_shares``: every rank's share of a per-row sum (log-sum-exp parts, target logit),
  stacked. Every rank then combines them identically, so the gradient reaching share r on rank
  r is already that share's whole gradient; the backward keeps it and sends nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        world_size = dist.get_world_size(group)
        size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = [torch.empty_like(size) for _ in range(world_size)]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s) for s in sizes]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded, group=group)
        rank = dist.get_rank(group)
        ctx.group, ctx.rows = group, (sum(sizes[:rank]), x.shape[0])
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        start, count = ctx.rows
        return total[start:start + count], None


class _GatherShares(torch.autograd.Function):
    @staticmethod
    def forward(ctx, share, group):
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(share) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, share.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """``cat`` over ranks, in rank order, of each rank's ``x [T_r, ...]`` (row counts may differ).
    Gradient: the sum over ranks of the gathered rows' gradients, restricted to this rank's rows.
    Messages: forward ``W x max_r T_r`` rows per rank; backward an all_reduce of ``sum_r T_r`` rows."""
    return _GatherRows.apply(x, group)


def gather_shares(share: torch.Tensor, group=None) -> torch.Tensor:
    """``[W, ...]``: every rank's ``share`` (same shape on each). Only for a result that every rank
    then combines identically; the backward returns this rank's slice of the gradient."""
    return _GatherShares.apply(share, group)
