"""Sequential recommenders (SASRec, BERT4Rec, GRU4Rec) with dense or RecJPQ item embeddings."""
from __future__ import annotations

import torch

from recjpq.models.base import EMBEDDINGS, ItemScorer, SequentialRecommender, make_item_embedding
from recjpq.models.bert4rec import BERT4Rec
from recjpq.models.gru4rec import GRU4Rec
from recjpq.models.losses import LOSSES, gbce, sample_negatives, sampled_bce, softmax_cross_entropy
from recjpq.models.sasrec import SASRec

MODELS = {"sasrec": SASRec, "bert4rec": BERT4Rec, "gru4rec": GRU4Rec}


def build_model(model: str, num_items: int, codes: torch.Tensor | None = None, **kwargs) -> SequentialRecommender:
    """A model by name; ``kwargs`` are its constructor arguments (as saved in ``model.config``)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")
    return MODELS[model](num_items, codes=codes, **kwargs)


__all__ = ["MODELS", "EMBEDDINGS", "LOSSES", "build_model", "SequentialRecommender", "ItemScorer",
           "make_item_embedding", "SASRec", "BERT4Rec", "GRU4Rec", "softmax_cross_entropy", "sampled_bce",
           "gbce", "sample_negatives"]
