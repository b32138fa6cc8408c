"""Pure-PyTorch backend: the oracle every kernel is tested against.

It sums splits in order m = 0..M-1 in float32 and breaks ties towards the lower item index.
Memory stays O(B x chunk): items are scored a chunk at a time and merged into a running top-k
of packed int64 keys (ordered score bits high, reversed index low), so ties need no extra pass.
"""
from __future__ import annotations

import torch

from recjpq.topk_keys import pack_keys, unpack_keys, EMPTY_KEY

_CHUNK_ELEMENTS = 1 << 22  # B x chunk scores held at once (16 MB of float32)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _chunk_size(batch: int, n: int, k: int) -> int:
    return min(n, max(k, 1024, _CHUNK_ELEMENTS // batch))


def _chunk_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    idx = codes.long()
    scores = S[:, 0].index_select(1, idx[:, 0])
    for m in range(1, S.shape[1]):
        scores += S[:, m].index_select(1, idx[:, m])
    return scores


def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    batch, n = S.shape[0], codes.shape[0]
    out = torch.empty(batch, n, dtype=torch.float32, device=S.device)
    step = _chunk_size(batch, n, 1)
    for start in range(0, n, step):
        out[:, start:start + step] = _chunk_scores(S, codes[start:start + step])
    return out


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    del algorithm  # every algorithm is exact; the oracle always scans
    batch, n = S.shape[0], codes.shape[0]
    step = _chunk_size(batch, n, k)
    best = None
    for start in range(0, n, step):
        chunk = codes[start:start + step]
        width = chunk.shape[0]
        ids = torch.arange(start, start + width, device=S.device)
        keys = pack_keys(_chunk_scores(S, chunk), ids.expand(batch, width))
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < width)
            # excluded columns get the empty key; misses land in a spare column that is dropped
            spare = torch.cat([keys, keys.new_empty(batch, 1)], dim=1)
            spare.scatter_(1, torch.where(hit, local, width), EMPTY_KEY)
            keys = spare[:, :width]
        cand = keys if best is None else torch.cat([best, keys], dim=1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
    return unpack_keys(best)


def pq_cross_entropy_forward(S: torch.Tensor, codes: torch.Tensor, scale: float) -> torch.Tensor:
    """``lse[b] = log sum_i exp(scale * score[b, i])``, merged chunk by chunk (S's dtype)."""
    batch, n = S.shape[0], codes.shape[0]
    step = _chunk_size(batch, n, 1)
    lse = S.new_full((batch,), float("-inf"))
    for start in range(0, n, step):
        chunk_lse = torch.logsumexp(_chunk_scores(S, codes[start:start + step]) * scale, dim=1)
        lse = torch.logaddexp(lse, chunk_lse)
    return lse


def pq_cross_entropy_backward(S: torch.Tensor, codes: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """The gradient of ``sum_b grad_lse[b] * lse[b]`` with respect to S: each item's softmax
    probability, recomputed chunk by chunk, added to the sub-ids it is made of."""
    batch, n = S.shape[0], codes.shape[0]
    step = _chunk_size(batch, n, 1)
    weight = (grad_lse * scale).unsqueeze(1)
    # a sub-id collects the probabilities of up to N items: sum them in float64, as the C++ kernel does,
    # so the entries that cancel against the target's -1 keep float32 accuracy
    dS = torch.zeros_like(S, dtype=torch.float64)
    for start in range(0, n, step):
        chunk = codes[start:start + step]
        grads = (torch.exp(_chunk_scores(S, chunk) * scale - lse.unsqueeze(1)) * weight).double()
        idx = chunk.long()
        for m in range(S.shape[1]):
            dS[:, m].index_add_(1, idx[:, m], grads)
    return dS.to(S.dtype)
