from __future__ import annotations

import torch
from torch import nn

from recjpq import ops
from recjpq.ops.subitem_scores import score_dtype
from recjpq._validate import FLOAT_DTYPES, check_codes, check_tensor


_SCAN_ALGORITHMS = ("exhaustive", "prune")  # pq_topk's, on S


class PQEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding`` over a product-quantised item catalogue (RecJPQ).

    Item i's embedding is the concatenation over splits m of ``subitem_embeddings[m, codes[i, m]]``.
    The only parameters are the sub-item embeddings ``[M, K, dim // M]``; the codes ``[N, M]`` are a
    buffer saved in the state dict. Scoring goes through ``recjpq.ops`` and never builds the
    ``[N, dim]`` item table. ``padding_idx``, as in ``nn.Embedding``, embeds to zeros; it also
    scores 0 and is never returned by ``topk``.
    """

    def __init__(self, codes: torch.Tensor, dim: int, num_codes: int = 256, padding_idx: int | None = None):
        super().__init__()
        check_codes(codes, num_codes)
        num_items, num_splits = codes.shape
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dim % num_splits != 0:
            raise ValueError(f"dim={dim} must be divisible by the number of splits M={num_splits}")
        if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"codes must lie in [0, num_codes={num_codes}), got values in [{lo}, {hi}]")
        if padding_idx is not None:
            if padding_idx < 0:
                padding_idx += num_items
            if not 0 <= padding_idx < num_items:
                raise ValueError(f"padding_idx must index an item in [0, {num_items}), got {padding_idx}")
        self.num_embeddings = num_items
        self.embedding_dim = dim
        self.num_splits = num_splits
        self.num_codes = num_codes
        self.padding_idx = padding_idx
        self.register_buffer("codes", codes.detach().clone().contiguous())
        self.subitem_embeddings = nn.Parameter(torch.empty(num_splits, num_codes, dim // num_splits))
        self.reset_parameters()

    @classmethod
    def from_dense(cls, embedding: nn.Embedding | torch.Tensor, num_splits: int, num_codes: int = 256,
                   **quantize_kwargs) -> "PQEmbedding":
        """Product-quantise a trained ``nn.Embedding`` (or ``[N, d]`` weight) into a PQEmbedding
        with the same ids, padding row and device (``recjpq.convert.quantize`` does the math;
        ``quantize_kwargs`` go to it). With ``rotate=True`` or a ``metric`` the result is a
        ``recjpq.convert.RotatedPQEmbedding``."""
        from recjpq.convert import RotatedPQEmbedding, quantize

        weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"embedding must be an nn.Embedding or a tensor, got {type(embedding).__name__}")
        padding_idx = embedding.padding_idx if isinstance(embedding, nn.Embedding) else None
        out = quantize(weight, num_splits, num_codes, padding_idx=padding_idx, **quantize_kwargs)
        codes, centroids = out[0], out[1]
        if len(out) == 3:
            module = RotatedPQEmbedding(codes, weight.shape[1], num_codes, padding_idx, rotation=out[2])
        else:
            module = cls(codes, weight.shape[1], num_codes, padding_idx)
        with torch.no_grad():
            module.subitem_embeddings.copy_(centroids)
        return module.to(device=weight.device, dtype=weight.dtype)

    def reset_parameters(self) -> None:
        # N(0, 1) per sub-item, so each concatenated item embedding matches nn.Embedding's init
        nn.init.normal_(self.subitem_embeddings)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, splits={self.num_splits}, num_codes={self.num_codes}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        check_tensor(name, ids, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise ValueError(f"{name} must lie in [0, {self.num_embeddings}), got [{int(ids.min())}, {int(ids.max())}]")

    def _not_padding(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.padding_idx is None else (ids != self.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids("ids", ids)
        item_codes = self.codes[ids.long()].long()  # [..., M]
        split = torch.arange(self.num_splits, device=ids.device)
        out = self.subitem_embeddings[split, item_codes].flatten(-2)  # [..., M, dsub] -> [..., dim]
        keep = self._not_padding(ids)
        return out if keep is None else out * keep.unsqueeze(-1).to(out.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded ``[N, dim]`` item table (materialised on each access; for interop and tests)."""
        return self(torch.arange(self.num_embeddings, device=self.codes.device))

    def subitem_scores(self, seq_emb: torch.Tensor) -> torch.Tensor:
        """S ``[..., M, K]`` for sequence embeddings ``[..., dim]``."""
        return ops.subitem_scores(seq_emb, self.subitem_embeddings)

    def score(self, seq_emb: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores of candidate items: ``seq_emb [..., dim]`` with ``item_ids [..., T]`` (same
        leading dims) or ``[T]`` (shared) -> ``[..., T]``."""
        self._check_seq(seq_emb)
        self._check_ids("item_ids", item_ids)
        if item_ids.dim() > 1 and item_ids.shape[:-1] != seq_emb.shape[:-1]:
            raise ValueError(f"item_ids leading shape {tuple(item_ids.shape[:-1])} does not match "
                             f"seq_emb leading shape {tuple(seq_emb.shape[:-1])}")
        if item_ids.shape[-1] * self.embedding_dim < self.num_splits * self.num_codes:
            # few candidates (sampled-softmax targets and negatives): decoding their T x d rows
            # costs less than the M x K table S, in time and in memory
            rows = self(item_ids)  # padding rows are zero
            dtype = score_dtype(seq_emb, rows)
            q, rows = seq_emb.to(dtype), rows.to(dtype)
            return (q @ rows.t() if item_ids.dim() == 1 else (rows @ q.unsqueeze(-1)).squeeze(-1)).float()
        S = self.subitem_scores(seq_emb)  # [..., M, K]
        item_codes = self.codes[item_ids.long()].long()  # [..., T, M] or [T, M]
        if item_ids.dim() == 1:
            item_codes = item_codes.expand(*seq_emb.shape[:-1], *item_codes.shape)
        # gather S[..., m, code[..., t, m]] for all t: index along K with a [..., M, T] tensor
        picked = torch.gather(S, -1, item_codes.transpose(-1, -2))
        scores = picked.sum(-2)
        keep = self._not_padding(item_ids)
        return scores if keep is None else scores * keep.to(scores.dtype)

    def _check_seq(self, seq_emb: torch.Tensor) -> None:
        check_tensor("seq_emb", seq_emb, dtypes=FLOAT_DTYPES)
        if seq_emb.dim() < 1 or seq_emb.shape[-1] != self.embedding_dim:
            raise ValueError(f"seq_emb must end in dim={self.embedding_dim}, got shape {tuple(seq_emb.shape)}")

    def _flat_table(self, seq_emb: torch.Tensor) -> torch.Tensor:
        self._check_seq(seq_emb)
        return self.subitem_scores(seq_emb.reshape(-1, self.embedding_dim))

    def score_all(self, seq_emb: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """Scores of every item, ``[..., N]`` (B x N: prefer ``topk`` for retrieval)."""
        scores = ops.pq_scores(self._flat_table(seq_emb), self.codes, backend=backend)
        if self.padding_idx is not None:
            scores = scores.index_fill(1, torch.tensor([self.padding_idx], device=scores.device), 0.0)
        return scores.view(*seq_emb.shape[:-1], self.num_embeddings)

    def topk(self, seq_emb: torch.Tensor, k: int, exclude: torch.Tensor | None = None, *,
             backend: str | None = None, algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The k best items for ``seq_emb [B, dim]`` (leading dims are flattened into B); the
        padding item is always excluded. ``algorithm``: ``recjpq.ops.pq_topk_query``'s (``"auto"``
        picks the fused scan or the cached decoded table by shape), or ``pq_topk``'s scans
        ``"exhaustive"`` / ``"prune"``."""
        self._check_seq(seq_emb)
        seq_emb = seq_emb.reshape(-1, self.embedding_dim)
        if self.padding_idx is not None:
            pad = torch.full((seq_emb.shape[0], 1), self.padding_idx, dtype=torch.int64, device=seq_emb.device)
            exclude = pad if exclude is None else torch.cat([exclude, pad], dim=1)
        # a subclass that changes the scores (a rotated query space) scores through its own S
        if algorithm in _SCAN_ALGORITHMS or type(self).subitem_scores is not PQEmbedding.subitem_scores:
            return ops.pq_topk(self.subitem_scores(seq_emb), self.codes, k, exclude=exclude, backend=backend,
                               algorithm=algorithm if algorithm in _SCAN_ALGORITHMS else "auto")
        return ops.pq_topk_query(seq_emb, self.subitem_embeddings, self.codes, k, exclude=exclude, backend=backend,
                                 algorithm=algorithm)
