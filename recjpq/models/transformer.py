"""The self-attention stack SASRec (causal) and BERT4Rec (bidirectional) share."""
from __future__ import annotations

import torch
from torch import nn

from recjpq.data.split import PAD


class TransformerStack(nn.Module):
    """Pre-norm transformer blocks over left-padded sequences with learned positions.

    Padding keys are masked out; every position may attend to itself, so rows of padding
    never see an all-masked softmax. Outputs at padding positions are zeroed.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, dropout: float, max_len: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_heads = num_heads
        self.positions = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=dim, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        """``x [B, L, d]`` embedded inputs, ``seqs [B, L]`` ids (0 = padding) -> ``[B, L, d]``."""
        batch, length = seqs.shape
        if length > self.positions.num_embeddings:
            raise ValueError(f"sequences of length {length} exceed max_len={self.positions.num_embeddings}")
        pos = torch.arange(self.positions.num_embeddings - length, self.positions.num_embeddings,
                           device=seqs.device)  # right-aligned: the newest item has the last position
        x = self.dropout(x + self.positions(pos))
        is_pad = seqs == PAD
        blocked = is_pad.unsqueeze(1).expand(batch, length, length)
        if self.causal:
            blocked = blocked | torch.ones(length, length, dtype=torch.bool, device=seqs.device).triu(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seqs.device)
        mask = blocked.repeat_interleave(self.num_heads, dim=0)
        keep = (~is_pad).unsqueeze(-1).to(x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=mask) * keep
        return self.norm(x) * keep
