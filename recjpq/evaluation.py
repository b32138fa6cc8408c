"""Full-catalogue ranking metrics for leave-one-out targets (no sampled candidates)."""
from __future__ import annotations

import numpy as np
import torch

from recjpq.data.split import EvalSet, PAD, batches, pad_left
from recjpq.models.base import SequentialRecommender


@torch.no_grad()
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
    kmax = min(ks[-1], model.num_items)
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
        _, top = model.scorer.topk(model.query(pad_left(histories, max_len).to(device)), kmax, exclude)
        hit = top.cpu().numpy() == data.targets[idx, None]
        found = hit.any(1)
        ranks[idx[found]] = hit[found].argmax(1)
    out = {}
    for k in ks:
        inside = ranks < k
        out[f"ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0) + 2), 0.0).mean())
        out[f"recall@{k}"] = float(inside.mean())
    return out
