from __future__ import annotations

import torch
from torch import nn

from recjpq.data.split import PAD
from recjpq.models.base import SequentialRecommender, make_item_embedding
from recjpq.models.sasrec import CausalTraining


class GRU4Rec(CausalTraining, SequentialRecommender):
    """GRU4Rec (Hidasi et al., 2016) trained on whole sequences with a tied output layer."""

    def __init__(self, num_items: int, dim: int = 64, *, item_embedding: str = "dense",
                 codes: torch.Tensor | None = None, num_codes: int = 256, num_layers: int = 1,
                 dropout: float = 0.2, max_len: int = 200):
        super().__init__()
        self.config = dict(model="gru4rec", num_items=num_items, dim=dim, item_embedding=item_embedding,
                           num_codes=num_codes, num_layers=num_layers, dropout=dropout, max_len=max_len)
        self.item_embedding = make_item_embedding(item_embedding, num_items + 1, dim, codes, num_codes)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.dropout(self.item_embedding(seqs)))
        return self.dropout(out) * (seqs != PAD).unsqueeze(-1).to(out.dtype)
