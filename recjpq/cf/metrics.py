"""Full-ranking Recall@K and NDCG@K with each user's training items excluded (NGCF / LightGCN protocol)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


@torch.no_grad()
def full_ranking(user_emb: torch.Tensor, item_emb: torch.Tensor, train: sp.csr_matrix, test: sp.csr_matrix,
                 k: int = 20, chunk: int = 1024) -> dict:
    """Means over users with test items: Recall@K = hits / |test items|; NDCG@K with the ideal DCG
    over ``min(|test items|, K)`` positions. Scores are ``user_emb @ item_emb.T``, on the
    embeddings' device."""
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"embeddings must be [users, d] and [items, d], got {tuple(user_emb.shape)} and "
                         f"{tuple(item_emb.shape)}")
    shape = (user_emb.shape[0], item_emb.shape[0])
    if train.shape != shape or test.shape != shape:
        raise ValueError(f"train {train.shape} and test {test.shape} must both be {shape}")
    users = np.flatnonzero(np.diff(test.indptr))
    if users.size == 0:
        raise ValueError("no user has test items")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.concatenate([[0.0], discount.cumsum()])
    recall = np.empty(users.size)
    ndcg = np.empty(users.size)
    device = user_emb.device
    for start in range(0, users.size, chunk):
        rows = users[start:start + chunk]
        scores = user_emb[torch.from_numpy(rows).to(device)] @ item_emb.T
        seen = train[rows].tocoo()
        scores[torch.from_numpy(seen.row).long().to(device), torch.from_numpy(seen.col).long().to(device)] = -torch.inf
        top = scores.topk(min(k, shape[1]), dim=1).indices.cpu().numpy().copy()  # scipy indexing wants writeable
        wanted = test[rows]
        hits = np.asarray(wanted[np.arange(rows.size)[:, None], top].todense()) > 0
        sizes = np.diff(wanted.indptr)
        recall[start:start + rows.size] = hits.sum(1) / sizes
        ndcg[start:start + rows.size] = (hits * discount[:hits.shape[1]]).sum(1) / ideal[np.minimum(sizes, k)]
    return {f"recall@{k}": float(recall.mean()), f"ndcg@{k}": float(ndcg.mean()), "users": int(users.size),
            "per_user_recall": recall, "per_user_ndcg": ndcg}
