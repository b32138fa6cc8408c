"""Training losses over the tied item embedding, evaluated at the positions that have a target.

``hidden [T, d]`` are sequence states, ``targets [T]`` the items they should predict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from recjpq import ops
from recjpq.models.base import ItemScorer

LOSSES = ("ce", "bce", "gbce")


def softmax_cross_entropy(scorer: ItemScorer, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full-catalogue softmax cross-entropy (targets in ``1..num_items``). The padding item is a
    constant zero logit in both cases. For RecJPQ the fused ``recjpq.ops.pq_cross_entropy``
    computes it without the ``[T, N]`` logits, over the real items (codes rows 1..N); the padding
    item's zero logit is then added to each row's log-sum-exp."""
    if not scorer.is_pq:
        return F.cross_entropy(scorer.all(hidden), targets)
    emb = scorer.embedding
    real = ops.pq_cross_entropy(emb.subitem_scores(hidden), emb.codes[1:], targets - 1, reduction="none")
    target_logit = scorer.items(hidden, targets.unsqueeze(-1)).squeeze(-1)
    # real = lse - target_logit over the real items; with the zero logit, lse becomes logaddexp(lse, 0)
    return (real + F.softplus(-(real + target_logit))).mean()


def sample_negatives(targets: torch.Tensor, num_items: int, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform negatives ``[T, num_negatives]`` in ``1..num_items`` (a hit on the target is
    rare and, as in SASRec, left in)."""
    return torch.randint(1, num_items + 1, (targets.shape[0], num_negatives), device=targets.device,
                         generator=generator)


def _pos_neg_logits(scorer, hidden, targets, negatives):
    return scorer.items(hidden, targets.unsqueeze(-1)).squeeze(-1), scorer.items(hidden, negatives)


def sampled_bce(scorer: ItemScorer, hidden: torch.Tensor, targets: torch.Tensor,
                negatives: torch.Tensor) -> torch.Tensor:
    """SASRec's binary cross-entropy: the target against sampled negatives."""
    return gbce(scorer, hidden, targets, negatives, num_items=None)


def gbce(scorer: ItemScorer, hidden: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
         num_items: int | None, t: float = 0.75) -> torch.Tensor:
    """gSASRec's generalised BCE (Petrov & Macdonald, 2023): the positive term is raised to
    ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)`` with ``alpha = negatives / (num_items - 1)``,
    which undoes the overconfidence that negative sampling causes. ``num_items=None`` or
    ``t=0`` gives plain BCE."""
    pos, neg = _pos_neg_logits(scorer, hidden, targets, negatives)
    beta = 1.0
    if num_items is not None:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"gbce t must be in [0, 1], got {t}")
        alpha = negatives.shape[1] / (num_items - 1)
        beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    per_position = -beta * F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)
    return per_position.mean() / (1 + negatives.shape[1])
