from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recjpq.data.split import PAD
from recjpq.models.base import SequentialRecommender, make_item_embedding
from recjpq.models.transformer import TransformerStack


class BERT4Rec(SequentialRecommender):
    """BERT4Rec (Sun et al., 2019): bidirectional self-attention trained to fill masked items.

    The mask token is its own vector, outside the (possibly product-quantised) item table, so
    the catalogue and its codes stay exactly the items. Prediction appends a mask to the history.
    """

    padding_invariant = True

    def __init__(self, num_items: int, dim: int = 64, *, item_embedding: str = "dense",
                 codes: torch.Tensor | None = None, num_codes: int = 256, num_layers: int = 2,
                 num_heads: int = 2, dropout: float = 0.2, max_len: int = 200, mask_prob: float = 0.2):
        super().__init__()
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.config = dict(model="bert4rec", num_items=num_items, dim=dim, item_embedding=item_embedding,
                           num_codes=num_codes, num_layers=num_layers, num_heads=num_heads,
                           dropout=dropout, max_len=max_len, mask_prob=mask_prob)
        self.mask_id = num_items + 1
        self.item_embedding = make_item_embedding(item_embedding, num_items + 1, dim, codes, num_codes)
        self.mask_embedding = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.encoder = TransformerStack(dim, num_layers, num_heads, dropout, max_len, causal=False)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        masked = seqs == self.mask_id
        x = self.item_embedding(seqs.masked_fill(masked, PAD))
        x = torch.where(masked.unsqueeze(-1), self.mask_embedding.to(x.dtype), x) * self.config["dim"] ** 0.5
        return self.encoder(x, seqs)

    def query(self, seqs: torch.Tensor) -> torch.Tensor:
        with_mask = torch.cat([seqs[:, 1:], torch.full_like(seqs[:, :1], self.mask_id)], dim=1)
        return self.encode(with_mask)[:, -1]

    def training_example(self, seqs: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Cloze task: each item is masked with ``mask_prob``, and the last item of every
        sequence is always masked so the model also sees the prediction-time pattern."""
        real = seqs != PAD
        masked = torch.from_numpy(rng.random(seqs.shape) < self.config["mask_prob"]).to(seqs.device)
        masked[:, -1] = True
        masked &= real
        targets = torch.where(masked, seqs, torch.zeros_like(seqs))
        return seqs.masked_fill(masked, self.mask_id), targets
