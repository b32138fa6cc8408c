"""Exact top-k over a catalogue sharded across ranks.

Each rank runs the fused ``recjpq.ops.pq_topk`` on its shard and packs its candidates (value,
global id) into one int64 key each (``recjpq.topk_keys``); one all_gather of ``B x k`` keys per
rank and a top-k over the ``W x k`` gathered keys give the global answer. The keys order by
value, then by lower global id, so the merge reproduces single-process ``pq_topk`` exactly:
every global top-k item is in its own shard's top-k, and ties break the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from recjpq import ops
from recjpq._validate import check_tensor
from recjpq.distributed.catalogue import CatalogueShard
from recjpq.topk_keys import EMPTY_KEY, pack_keys, unpack_keys


def _check_args(S, shard: CatalogueShard, k, exclude) -> None:
    if not isinstance(shard, CatalogueShard):
        raise TypeError(f"shard must be a CatalogueShard, got {type(shard).__name__}")
    check_tensor("S", S, ndim=3)
    if S.shape[1] != shard.num_splits:
        raise ValueError(f"S has M={S.shape[1]} splits but the shard's codes have M={shard.num_splits}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= shard.num_items:
        raise ValueError(f"k must be in [1, N={shard.num_items}], got k={k}")
    if exclude is not None:
        check_tensor("exclude", exclude, ndim=2, dtypes=(torch.int64,))
        if exclude.shape[0] != S.shape[0]:
            raise ValueError(f"exclude has {exclude.shape[0]} rows but S has B={S.shape[0]} queries")
        if exclude.numel() and (int(exclude.min()) < -1 or int(exclude.max()) >= shard.num_items):
            raise ValueError(f"exclude ids must be in [-1, N={shard.num_items}), got values in "
                             f"[{int(exclude.min())}, {int(exclude.max())}]")


def local_candidates(S: torch.Tensor, shard: CatalogueShard, k: int, exclude: torch.Tensor | None = None, *,
                     backend: str | None = None, algorithm: str = "auto") -> torch.Tensor:
    """This shard's best ``min(k, shard size)`` items as packed keys ``[B, k]`` with global ids,
    padded with ``EMPTY_KEY``. ``exclude`` holds global ids; those outside the shard are dropped."""
    _check_args(S, shard, k, exclude)
    if exclude is not None:
        local = exclude - shard.start
        exclude = torch.where((local >= 0) & (local < shard.codes.shape[0]), local, -1)
    values, indices = ops.pq_topk(S, shard.codes, min(k, shard.codes.shape[0]), exclude=exclude,
                                  backend=backend, algorithm=algorithm)
    keys = torch.where(indices >= 0, pack_keys(values, indices + shard.start), EMPTY_KEY)
    if keys.shape[1] < k:
        keys = torch.cat([keys, keys.new_full((keys.shape[0], k - keys.shape[1]), EMPTY_KEY)], dim=1)
    return keys


def merge_candidates(keys: torch.Tensor, k: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every rank's ``[B, k]`` keys and keep the best k: ``(values [B, k], global ids [B, k])``."""
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, keys, group=group)
    best = torch.topk(torch.cat(parts, dim=1), k, dim=1, sorted=True).values
    return unpack_keys(best)


def pq_topk(S: torch.Tensor, shard: CatalogueShard, k: int, *, exclude: torch.Tensor | None = None,
            backend: str | None = None, algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``recjpq.ops.pq_topk`` over the whole sharded catalogue; every rank gets the result.

    Call it on every rank of ``shard.group`` with the same S ``[B, M, K]``, k and ``exclude``
    (int64 ``[B, E]`` global ids, -1 = none). Returns ``(values [B, k] float32, global ids
    [B, k] int64)``, equal to single-process ``pq_topk`` on the full codes: ties to the lower
    global id, a ``(-inf, -1)`` tail if fewer than k items remain. ``backend``/``algorithm`` pick
    the local top-k. Messages: one all_gather of ``B x k`` int64 per rank. Not differentiable
    (score the returned ids with ``PQEmbedding.score`` where gradients are needed).
    """
    keys = local_candidates(S, shard, k, exclude, backend=backend, algorithm=algorithm)
    return merge_candidates(keys, k, shard.group)
