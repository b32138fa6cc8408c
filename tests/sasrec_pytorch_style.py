"""A model of our own written in the shape of pmixer's SASRec.pytorch (``item_emb``,
``log2feats(log_seqs)`` on numpy left-padded sequences, ``predict(user_ids, log_seqs,
item_indices)``), shared by the patch/convert tests and importable by their fresh-process checks."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SASRecPytorchStyle(nn.Module):
    """Item ids 1..N, 0 = padding; numpy sequences in, like the original's training loop."""

    def __init__(self, item_num: int, hidden: int, max_len: int):
        super().__init__()
        self.item_emb = nn.Embedding(item_num + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def log2feats(self, log_seqs):
        seqs = torch.as_tensor(np.asarray(log_seqs)).long()
        x = self.item_emb(seqs) * self.item_emb.embedding_dim ** 0.5 + self.pos_emb.weight[: seqs.shape[1]]
        x = x * (seqs != 0).unsqueeze(-1)
        return self.norm(torch.tanh(self.mix(x)).cumsum(1))

    def predict(self, user_ids, log_seqs, item_indices):
        final = self.log2feats(log_seqs)[:, -1, :]
        item_embs = self.item_emb(torch.as_tensor(np.asarray(item_indices)).long())
        return item_embs.matmul(final.unsqueeze(-1)).squeeze(-1)
