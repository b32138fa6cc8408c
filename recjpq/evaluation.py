"""Full-catalogue ranking metrics for leave-one-out targets (no sampled candidates)."""
from __future__ import annotations

import numpy as np
import torch

from recjpq.data.split import EvalSet, PAD, batches, pad_left
from recjpq.models.base import SequentialRecommender


@torch.no_grad()
def target_ranks(model: SequentialRecommender, data: EvalSet, k: int, *, exclude_seen: bool = False,
                 batch_size: int = 256, max_users: int | None = None) -> np.ndarray:
    """Each user's 0-based rank of its target in the model's top ``k`` over all items (``inf``
    outside it), in user order: per-user figures, for paired comparisons of two models."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(int(k), model.num_items)
    num = len(data) if max_users is None else min(max_users, len(data))
    if num == 0:
        raise ValueError("nothing to evaluate: the split has no users with a target")
    device = next(model.parameters()).device
    model.eval()
    ranks = np.full(num, np.inf)
    max_len = model.config["max_len"]
    for idx in batches(num, batch_size):
        histories = [data.histories[j] for j in idx]
        exclude = None
        if exclude_seen:
            exclude = pad_left(histories, max(1, max(len(h) for h in histories))).to(device)
            exclude[exclude == PAD] = -1
        _, top = model.scorer.topk(model.query(pad_left(histories, max_len).to(device)), k, exclude)
        hit = top.cpu().numpy() == data.targets[idx, None]
        found = hit.any(1)
        ranks[idx[found]] = hit[found].argmax(1)
    return ranks


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of one relevant item at 0-based ``ranks``: ``1 / log2(rank + 2)`` inside the top k."""
    inside = ranks < k
    return np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0) + 2), 0.0)


def evaluate(model: SequentialRecommender, data: EvalSet, ks=(10,), *, exclude_seen: bool = False,
             batch_size: int = 256, max_users: int | None = None) -> dict[str, float]:
    """NDCG@k and Recall@k of each user's single target over all items.

    Ranking goes through the model's ``scorer.topk`` (``recjpq.ops.pq_topk`` for RecJPQ), with
    the history excluded when ``exclude_seen``. ``max_users`` evaluates the first users only
    (quick validation). With one relevant item, Recall@k is the hit rate and NDCG@k is
    ``1 / log2(rank + 2)`` inside the top k.
    """
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive ints, got {ks}")
    ranks = target_ranks(model, data, ks[-1], exclude_seen=exclude_seen, batch_size=batch_size, max_users=max_users)
    out = {}
    for k in ks:
        out[f"ndcg@{k}"] = float(ndcg_at(ranks, k).mean())
        out[f"recall@{k}"] = float((ranks < k).mean())
    return out
