"""MF-BPR and LightGCN over any embedding tables with ``num_embeddings`` and ``forward(ids)``
(``nn.Embedding``, ``recjpq.nn.ClusterEmbedding``)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recjpq._sparse import csr_matrix, sparse_product


def normalized_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` of the symmetric (users + items) graph as a float32 CSR tensor (items offset
    by ``num_users``), LightGCN's propagation matrix."""
    users = torch.as_tensor(users, dtype=torch.int64)
    items = torch.as_tensor(items, dtype=torch.int64) + num_users
    n = num_users + num_items
    rows, cols = torch.cat([users, items]), torch.cat([items, users])
    degree = torch.bincount(rows, minlength=n).double()
    inv = degree.clamp_min(1.0).rsqrt()
    values = (inv[rows] * inv[cols]).float()
    return csr_matrix(rows, cols, values, (n, n))


def _all_rows(table: nn.Module) -> torch.Tensor:
    """Every entity's embedding, on the table's device: a table's own ``all_rows`` where it has one
    (``ClusterEmbedding``: a sparse product instead of a gather of every entity's rows), a plain
    ``nn.Embedding``'s weight itself (its gradient lands there directly, no gather or sort-based
    scatter per step), else the rows of every id."""
    if hasattr(table, "all_rows"):
        return table.all_rows()
    if type(table) is nn.Embedding and table.max_norm is None:
        return table.weight
    return table(torch.arange(table.num_embeddings, device=next(table.parameters()).device))


class MF(nn.Module):
    """Matrix factorisation: score(u, i) = <user_u, item_i>."""

    def __init__(self, users: nn.Module, items: nn.Module):
        super().__init__()
        self.users, self.items = users, items

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor):
        """Final and layer-0 (ego) embeddings of the batch: ``(u, i, u0, i0)``; for MF they coincide."""
        u, i = self.users(user_ids), self.items(item_ids)
        return u, i, u, i

    @torch.no_grad()
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _all_rows(self.users), _all_rows(self.items)


class LightGCN(nn.Module):
    """LightGCN (He et al., SIGIR 2020): the mean of ``layers + 1`` propagations of the ego
    embeddings over the normalised graph; one full propagation per training step. The adjacency
    is a buffer, so ``.to(device)`` moves it with the tables."""

    def __init__(self, users: nn.Module, items: nn.Module, adjacency: torch.Tensor, layers: int = 3):
        super().__init__()
        n = users.num_embeddings + items.num_embeddings
        if adjacency.shape != (n, n):
            raise ValueError(f"adjacency must be [{n}, {n}] (users + items), got {tuple(adjacency.shape)}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be an int >= 0, got {layers!r}")
        self.users, self.items, self.layers = users, items, layers
        self.register_buffer("adjacency", adjacency, persistent=False)

    def _ego(self) -> torch.Tensor:
        return torch.cat([_all_rows(self.users), _all_rows(self.items)])

    def _propagate(self, ego: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total, x = ego, ego
        for _ in range(self.layers):
            x = sparse_product(self.adjacency, x, self.adjacency)  # symmetric: its own transpose
            total = total + x
        out = total / (self.layers + 1)
        return out[:self.users.num_embeddings], out[self.users.num_embeddings:]

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor):
        ego = self._ego()
        users, items = self._propagate(ego)
        return users[user_ids], items[item_ids], ego[user_ids], ego[self.users.num_embeddings + item_ids]

    @torch.no_grad()
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._propagate(self._ego())
