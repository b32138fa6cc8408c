"""The model side of the server: raw item ids <-> model ids, request checks, and one batched
forward + one fused top-k for many queries.

Checks live here, not in the HTTP layer, so a bad query is rejected before it can join a batch
(one bad request must never fail its batch-mates).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from recjpq.checkpoint import load_checkpoint, nonfinite_tensors
from recjpq.data.split import PAD, pad_left
from recjpq.models import SequentialRecommender

MAX_REPORTED_UNKNOWN = 10  # unknown ids quoted in an error message


@dataclass(frozen=True)
class Query:
    """One user's request in model ids: ``history`` oldest first (full length: every seen item is
    excluded; the model reads only the last ``max_len``)."""

    history: np.ndarray
    k: int
    exclude_seen: bool


@dataclass(frozen=True)
class Recommendation:
    items: list
    scores: list[float]


class Recommender:
    """A checkpointed sequential recommender ready to serve.

    ``item_ids[j]`` is the raw id of model item ``j + 1`` (``recjpq train`` stores them as strings
    in the checkpoint's meta); without them the raw ids are the model ids ``1..num_items``.
    """

    def __init__(self, model: SequentialRecommender, item_ids=None, *, backend: str | None = None,
                 max_k: int = 1000):
        if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
            raise ValueError(f"max_k must be a positive int, got {max_k!r}")
        bad = nonfinite_tensors(model.state_dict())
        if bad:
            raise ValueError(f"the model has non-finite (NaN or inf) weights in {', '.join(bad)}: every request "
                             "would fail; refusing to serve it (a diverged training run?)")
        self.model = model.eval()
        self.backend = backend
        self.num_items = model.num_items
        self.max_len = int(model.config["max_len"])
        self.max_k = min(max_k, self.num_items)
        if item_ids is None:
            self.item_ids = list(range(1, self.num_items + 1))
            self._index = None
        else:
            if len(item_ids) != self.num_items:
                raise ValueError(f"item_ids has {len(item_ids)} entries, the model has {self.num_items} items")
            self.item_ids = list(item_ids)
            self._index = {raw: pos + 1 for pos, raw in enumerate(self.item_ids)}
        self._device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> Recommender:
        model, meta = load_checkpoint(path)
        return cls(model, meta.get("item_ids"), **kwargs)

    def _model_id(self, raw) -> int:
        """Model id of a raw id, 0 when unknown. JSON ints match string catalogues by their digits."""
        if self._index is None:
            return raw if isinstance(raw, int) and 1 <= raw <= self.num_items else PAD
        if isinstance(raw, int):
            raw = str(raw)
        return self._index.get(raw, PAD)

    def query(self, history: list, k: int, exclude_seen: bool) -> Query:
        """A checked ``Query``; ``ValueError`` naming the problem otherwise."""
        if len(history) == 0:
            raise ValueError("history is empty: send at least one item id")
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must lie in [1, {self.max_k}], got {k}")
        ids = np.fromiter((self._model_id(raw) for raw in history), dtype=np.int64, count=len(history))
        if not ids.all():
            unknown = [history[i] for i in np.flatnonzero(ids == PAD)[:MAX_REPORTED_UNKNOWN]]
            raise ValueError(f"history has {int((ids == PAD).sum())} unknown item id(s), e.g. {unknown}")
        return Query(ids, k, exclude_seen)

    def recommend(self, queries: list[Query]) -> list[Recommendation]:
        """One model forward and one ``pq_topk`` for all ``queries`` (called off the event loop)."""
        k = max(q.k for q in queries)
        exclude = None
        if any(q.exclude_seen for q in queries):
            seen = [np.unique(q.history) if q.exclude_seen else np.zeros(0, dtype=np.int64) for q in queries]
            exclude = torch.full((len(queries), max(len(s) for s in seen)), -1, dtype=torch.int64)
            for row, s in enumerate(seen):
                exclude[row, :len(s)] = torch.from_numpy(s)
            exclude = exclude.to(self._device)
        seqs = pad_left([q.history for q in queries], self.max_len).to(self._device)
        with torch.inference_mode():
            values, indices = self.model.scorer.topk(self.model.query(seqs), k, exclude, backend=self.backend)
        out = []
        for q, row_values, row_indices in zip(queries, values.tolist(), indices.tolist()):
            found = [i for i in row_indices[:q.k] if i > 0]  # -1: fewer than k items left
            out.append(Recommendation([self.item_ids[i - 1] for i in found], row_values[:len(found)]))
        return out
