from __future__ import annotations

import numpy as np
import torch

from recjpq.models.base import SequentialRecommender, make_item_embedding
from recjpq.models.transformer import TransformerStack


class CausalTraining:
    """Next-item training: inputs ``seq[:-1]``, targets ``seq[1:]`` (0 = no target)."""

    def training_example(self, seqs: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        del rng
        return seqs[:, :-1], seqs[:, 1:]


class SASRec(CausalTraining, SequentialRecommender):
    """SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence."""

    padding_invariant = True

    def __init__(self, num_items: int, dim: int = 64, *, item_embedding: str = "dense",
                 codes: torch.Tensor | None = None, num_codes: int = 256, num_layers: int = 2,
                 num_heads: int = 1, dropout: float = 0.2, max_len: int = 200):
        super().__init__()
        self.config = dict(model="sasrec", num_items=num_items, dim=dim, item_embedding=item_embedding,
                           num_codes=num_codes, num_layers=num_layers, num_heads=num_heads,
                           dropout=dropout, max_len=max_len)
        self.item_embedding = make_item_embedding(item_embedding, num_items + 1, dim, codes, num_codes)
        self.encoder = TransformerStack(dim, num_layers, num_heads, dropout, max_len, causal=True)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        x = self.item_embedding(seqs) * self.config["dim"] ** 0.5
        return self.encoder(x, seqs)
