"""What every sequential recommender shares: the tied item embedding (dense or RecJPQ), scoring
of all items or of candidates, and the inference entry ``recommend``.

Item id 0 is padding: it embeds to zeros, scores 0 and is never recommended. The one place that
branches on the embedding type is ``ItemScorer``; models and losses only call its methods.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recjpq.data.split import PAD, pad_left
from recjpq.nn import PQEmbedding

EMBEDDINGS = ("dense", "recjpq")


def make_item_embedding(kind: str, vocab: int, dim: int, codes: torch.Tensor | None = None,
                        num_codes: int = 256) -> nn.Module:
    """``nn.Embedding`` (dense) or ``PQEmbedding`` over ``vocab`` ids with id 0 as padding."""
    if kind == "dense":
        emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        nn.init.normal_(emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            emb.weight[PAD].zero_()
        return emb
    if kind == "recjpq":
        if codes is None:
            raise ValueError("item_embedding='recjpq' needs codes [vocab, M] (see recjpq.codes.assign_codes)")
        if codes.shape[0] != vocab:
            raise ValueError(f"codes must have one row per item id 0..{vocab - 1} ({vocab} rows), "
                             f"got {codes.shape[0]}")
        emb = PQEmbedding(codes, dim, num_codes, padding_idx=PAD)
        with torch.no_grad():  # same per-item scale as the dense init
            emb.subitem_embeddings.mul_(dim ** -0.5)
        return emb
    raise ValueError(f"item_embedding must be one of {EMBEDDINGS}, got {kind!r}")


class ItemScorer:
    """Scores of the tied item embedding for sequence states ``h [..., d]``."""

    def __init__(self, embedding: nn.Module, backend: str | None = None):
        self.embedding = embedding
        self.backend = backend
        self.is_pq = isinstance(embedding, PQEmbedding)

    def all(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` logits (B x N: training losses and small catalogues only)."""
        if self.is_pq:
            return self.embedding.score_all(h, backend=self.backend)
        return h @ self.embedding.weight.t()

    def items(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scores of candidates: ``h [..., d]``, ``ids [..., T]`` -> ``[..., T]``."""
        if self.is_pq:
            return self.embedding.score(h, ids)
        return (h.unsqueeze(-2) * self.embedding(ids)).sum(-1)

    def topk(self, h: torch.Tensor, k: int, exclude: torch.Tensor | None = None, *,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best non-padding items for ``h [B, d]``; ``exclude`` int64 ``[B, E]``, -1 = none.
        RecJPQ goes through the fused ``recjpq.ops.pq_topk`` (never B x N) on ``backend``
        (default: this scorer's)."""
        if self.is_pq:
            return self.embedding.topk(h, k, exclude, backend=backend or self.backend)
        scores = h @ self.embedding.weight.t()
        scores[:, PAD] = float("-inf")
        if exclude is not None:
            rows = torch.arange(len(h), device=h.device).unsqueeze(1).expand_as(exclude)
            keep = exclude >= 0
            scores[rows[keep], exclude[keep]] = float("-inf")
        values, indices = torch.topk(scores, k, dim=1)
        return values, torch.where(torch.isinf(values), torch.full_like(indices, -1), indices)


class SequentialRecommender(nn.Module):
    """Base class: subclasses build ``item_embedding`` via ``make_item_embedding`` and implement
    ``encode(seqs [B, L]) -> [B, L, d]`` and ``query(seqs [B, L]) -> [B, d]`` (the state that
    predicts the next item)."""

    #: the constructor arguments, saved in checkpoints to rebuild the model
    config: dict
    #: the ``recjpq.backends`` name RecJPQ scoring runs on (None: the fastest available)
    ops_backend: str | None = None
    #: True where extra left padding cannot change the outputs at real positions (self-attention
    #: with padding keys masked and right-aligned positions; not a GRU, whose state runs through it)
    padding_invariant: bool = False

    def batch_width(self, sequences, width: int) -> int:
        """The padded width for a training batch: its longest sequence where padding is
        invisible to the model (less work for short sequences), else ``width``."""
        return min(width, max(1, max(len(s) for s in sequences))) if self.padding_invariant else width

    @property
    def scorer(self) -> ItemScorer:
        return ItemScorer(self.item_embedding, self.ops_backend)

    @property
    def num_items(self) -> int:
        return self.item_embedding.num_embeddings - 1

    def item_embedding_parameters(self) -> int:
        """Trainable parameters of the item table (the figure RecJPQ compresses)."""
        return sum(p.numel() for p in self.item_embedding.parameters())

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def query(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.encode(seqs)[:, -1]

    @torch.no_grad()
    def recommend(self, histories, k: int = 10, exclude_seen: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k next items for each history (lists/arrays of item ids ``1..num_items``, oldest
        first). Returns ``(scores [B, k], item ids [B, k])``; ids are -1 where fewer than k
        items could be returned. ``exclude_seen`` drops items already in the history."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_items:
            raise ValueError(f"k must be an int in [1, {self.num_items}], got {k!r}")
        histories = [np.asarray(h, dtype=np.int64) for h in histories]
        for h in histories:
            if h.size and (h.min() < 1 or h.max() > self.num_items):
                raise ValueError(f"history item ids must lie in [1, {self.num_items}], got {h.tolist()}")
        device = next(self.parameters()).device
        self.eval()
        seqs = pad_left(histories, self.config["max_len"]).to(device)
        exclude = None
        if exclude_seen:
            exclude = pad_left(histories, max(1, max(len(h) for h in histories))).to(device)
            exclude[exclude == PAD] = -1
        return self.scorer.topk(self.query(seqs), k, exclude)
