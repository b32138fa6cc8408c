"""Product quantisation of an already trained item table, so a dense model can score through recjpq.

``quantize`` turns an ``[N, d]`` item matrix into codes ``[N, M]`` and sub-item centroids
``[M, K, d / M]`` (the ``PQEmbedding`` layout): k-means per sub-space (Lloyd's algorithm in
PyTorch, on the weight's device), or the cheaper ``"svd"`` binning. ``rotate=True`` first learns
an orthogonal rotation (OPQ, Ge et al. 2013: principal directions dealt over the splits, then
alternating k-means and Procrustes) that balances the sub-spaces; it lowers the reconstruction
error most when a few directions carry most of the variance. ``finetune`` then trains
the sub-item embeddings with the model's own loss while the codes stay fixed.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from recjpq.codes.assign import codes_dtype
from recjpq.nn.pq_embedding import PQEmbedding

METHODS = ("kmeans", "svd")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _split(x: torch.Tensor, num_splits: int) -> torch.Tensor:
    """``[n, d]`` -> ``[M, n, d / M]``: the sub-vectors of each split side by side."""
    return x.view(x.shape[0], num_splits, -1).transpose(0, 1)


def _decode(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[N, d]`` reconstruction from codes ``[N, M]`` and centroids ``[M, K, d / M]``."""
    return centroids[torch.arange(centroids.shape[0], device=codes.device), codes.long()].flatten(1)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """The nearest centroid (squared L2) of each sub-vector: ``[M, n, dsub]`` -> ``[M, n]`` int64.

    Chunked over n so the ``[M, chunk, K]`` distance block stays near 64 MiB.
    """
    num_splits, n, _ = x.shape
    chunk = max(1, (1 << 24) // (num_splits * centroids.shape[1]))
    norms = centroids.square().sum(-1).unsqueeze(1)  # [M, 1, K]
    out = torch.empty(num_splits, n, dtype=torch.int64, device=x.device)
    for start in tqdm(range(0, n, chunk), desc="assign codes", disable=not progress, leave=False):
        block = x[:, start:start + chunk]
        out[:, start:start + chunk] = torch.baddbmm(norms, block, centroids.transpose(1, 2), alpha=-2).argmin(-1)
    return out


def _centroid_means(x: torch.Tensor, assign: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster means ``[M, K, dsub]`` (0 for empty clusters) and sizes ``[M, K]``."""
    num_splits, n, dsub = x.shape
    sums = x.new_zeros(num_splits, num_codes, dsub).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, dsub), x)
    counts = x.new_zeros(num_splits, num_codes).scatter_add_(1, assign, x.new_ones(num_splits, n))
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


def _random_points(x: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` training sub-vectors per split ``[M, count, dsub]`` (distinct rows while n allows)."""
    n = x.shape[1]
    if count <= n:
        rows = torch.randperm(n, generator=generator)[:count]
    else:
        rows = torch.randint(0, n, (count,), generator=generator)
    return x[:, rows.to(x.device)].clone()


def _kmeans_plus_plus(x: torch.Tensor, num_codes: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding in every split at once: ``[M, n, dsub]`` -> ``[M, K, dsub]``.

    Each new seed is a row drawn with probability proportional to its squared distance to the
    nearest seed so far, so separated clusters each get a seed and Lloyd's rounds do not have to
    pull one centroid across two of them. Draws use the CPU generator's uniforms on any device.
    """
    num_splits, n, _ = x.shape
    rows = torch.arange(num_splits, device=x.device)
    pick = (torch.rand(num_splits, generator=generator) * n).long().clamp(max=n - 1).to(x.device)
    seeds = [x[rows, pick]]
    dist = (x - seeds[0].unsqueeze(1)).square().sum(-1)  # [M, n]
    for _ in range(1, num_codes):
        cumulative = dist.cumsum(1)
        target = torch.rand(num_splits, 1, generator=generator).to(x.device) * cumulative[:, -1:]
        pick = torch.searchsorted(cumulative, target).squeeze(1).clamp(max=n - 1)
        seeds.append(x[rows, pick])
        dist = torch.minimum(dist, (x - seeds[-1].unsqueeze(1)).square().sum(-1))
    return torch.stack(seeds, 1)


def _kmeans(x: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator,
            init: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Lloyd's k-means in every split at once, from k-means++ seeds (or ``init``):
    ``[M, n, dsub]`` -> centroids ``[M, K, dsub]``. Between rounds an empty cluster is re-seeded
    at a random training point (nudged apart from it), so every one of the K sub-ids stays usable.
    """
    centroids = _kmeans_plus_plus(x, num_codes, generator) if init is None else init.clone()
    scale = x.std() if x.numel() > 1 else x.new_tensor(1.0)
    for step in tqdm(range(iters), desc="k-means", disable=not progress, leave=False):
        assign = _nearest(x, centroids)
        means, counts = _centroid_means(x, assign, num_codes)
        empty = (counts == 0).unsqueeze(-1)
        if step == iters - 1:  # no re-seeding after the last round: it would go unassigned
            return torch.where(empty, centroids, means)
        if bool(empty.any()):
            seeds = _random_points(x, num_codes, generator)
            noise = torch.randn(seeds.shape, generator=generator).to(x.device) * (1e-3 * scale)
            means = torch.where(empty, seeds + noise, means)
        centroids = means
    return centroids


def _svd_codes(x: torch.Tensor, num_splits: int, num_codes: int) -> torch.Tensor:
    """RecJPQ-style codes from the item vectors themselves: split m gets the m-th principal
    direction of the centred table, cut into K equal-frequency bins. Returns ``[N, M]`` int64."""
    centred = x - x.mean(0)
    _, vectors = torch.linalg.eigh(centred.T.double() @ centred.double())  # ascending eigenvalues
    projections = centred @ vectors[:, -num_splits:].flip(1).to(x.dtype)  # [N, M], largest first
    ranks = torch.empty_like(projections, dtype=torch.int64)
    order = projections.argsort(dim=0, stable=True)
    ranks.scatter_(0, order, torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(order).contiguous())
    return ranks * num_codes // x.shape[0]


def _balanced_rotation(x: torch.Tensor, num_splits: int) -> torch.Tensor:
    """OPQ's starting rotation: principal directions dealt round-robin over the splits (the j-th
    largest goes to split j mod M), so no split starts with all the variance."""
    centred = x - x.mean(0)
    _, vectors = torch.linalg.eigh(centred.T.double() @ centred.double())
    vectors = vectors.flip(1)  # largest eigenvalue first
    dim = x.shape[1]
    j = torch.arange(dim, device=x.device)
    rotation = torch.empty_like(vectors)
    rotation[:, (j % num_splits) * (dim // num_splits) + j // num_splits] = vectors
    return rotation.to(x.dtype)


def _procrustes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The orthogonal ``R`` minimising ``||x R - y||``."""
    u, _, vt = torch.linalg.svd(x.T.double() @ y.double())
    return (u @ vt).to(x.dtype)


def quantize(weight: torch.Tensor, num_splits: int, num_codes: int = 256, method: str = "kmeans", *,
             iters: int = 25, rotate: bool = False, opq_iters: int = 10, train_size: int | None = None,
             padding_idx: int | None = None, seed: int = 0, progress: bool = False):
    """Product-quantise an item matrix.

    Args:
        weight: ``[N, d]`` floating item table (an ``nn.Embedding.weight``); d % num_splits == 0.
            Runs on ``weight.device``.
        num_splits: M, sub-spaces per item.
        num_codes: K, centroids per sub-space (256 gives uint8 codes, what FAISS ``IndexPQ`` holds).
        method: ``"kmeans"`` (Lloyd, ``iters`` rounds, on up to ``train_size`` random rows, then
            every row gets its nearest centroid) or ``"svd"`` (principal-direction binning, one pass).
        rotate: learn an OPQ rotation first (``opq_iters`` alternations of k-means and Procrustes).
        train_size: rows sampled to fit k-means; default ``256 * K`` (FAISS's rule), all rows if fewer.
        padding_idx: a row left out of the fit (a padding row of zeros); it still gets codes.
        progress: tqdm bars for the OPQ and k-means rounds and the final assignment.

    Returns:
        ``(codes [N, M], centroids [M, K, d / M])``, codes in the narrowest dtype for K; with
        ``rotate=True`` also ``rotation [d, d]`` (orthogonal): item i is approximated by
        ``decode(codes[i]) @ rotation.T``, so a query q scores ``(q @ rotation)`` against the codes.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty [N, d] matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    _check_positive_int("num_splits", num_splits)
    _check_positive_int("num_codes", num_codes)
    _check_positive_int("iters", iters)
    _check_positive_int("opq_iters", opq_iters)
    num_items, dim = weight.shape
    if dim % num_splits:
        raise ValueError(f"the embedding dim {dim} must be divisible by num_splits={num_splits}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if train_size is None:
        train_size = 256 * num_codes
    _check_positive_int("train_size", train_size)
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or \
                not -num_items <= padding_idx < num_items:
            raise ValueError(f"padding_idx must index a row in [0, {num_items}), got {padding_idx!r}")
        padding_idx %= num_items
    x = weight.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("weight contains non-finite values (nan or inf)")
    generator = torch.Generator().manual_seed(seed)
    fit_rows = torch.arange(num_items)
    if padding_idx is not None and num_items > 1:
        fit_rows = fit_rows[fit_rows != padding_idx]
    if method == "kmeans" and len(fit_rows) > train_size:
        fit_rows = fit_rows[torch.randperm(len(fit_rows), generator=generator)[:train_size]]
    fit = x[fit_rows.to(x.device)]

    def train(data: torch.Tensor, rounds: int, init: torch.Tensor | None = None) -> torch.Tensor:
        """Centroids ``[M, K, dsub]`` for ``data [n, d]``."""
        if method == "kmeans":
            return _kmeans(_split(data, num_splits), num_codes, rounds, generator, init, progress)
        return _centroid_means(_split(data, num_splits), _svd_codes(data, num_splits, num_codes).T, num_codes)[0]

    rotation = None
    if rotate:
        rotation = _balanced_rotation(fit, num_splits)
        centroids = None
        for _ in tqdm(range(opq_iters), desc="OPQ", disable=not progress, leave=False):
            rotated = fit @ rotation
            centroids = train(rotated, max(1, iters // 5), centroids)
            decoded = _decode(_nearest(_split(rotated, num_splits), centroids).T, centroids)
            rotation = _procrustes(fit, decoded)
        x = x @ rotation
        fit = fit @ rotation
        centroids = train(fit, iters, centroids)
    else:
        centroids = train(fit, iters)
    codes = _nearest(_split(x, num_splits), centroids, progress).T.to(codes_dtype(num_codes)).contiguous()
    centroids = centroids.to(weight.dtype).contiguous()
    return (codes, centroids) if rotation is None else (codes, centroids, rotation.to(weight.dtype))


class RotatedPQEmbedding(PQEmbedding):
    """A ``PQEmbedding`` in an OPQ-rotated space: embeddings are ``decode(codes) @ rotation.T`` and
    queries are rotated by ``rotation`` before the sub-item scores, so scores stay inner products
    in the original space while every op (``score``, ``score_all``, ``topk``) is unchanged."""

    def __init__(self, codes: torch.Tensor, dim: int, num_codes: int = 256, padding_idx: int | None = None, *,
                 rotation: torch.Tensor):
        super().__init__(codes, dim, num_codes, padding_idx)
        if not isinstance(rotation, torch.Tensor) or rotation.shape != (dim, dim):
            raise ValueError(f"rotation must be a [{dim}, {dim}] tensor, got "
                             f"{getattr(rotation, 'shape', type(rotation).__name__)}")
        self.register_buffer("rotation", rotation.detach().clone().float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) @ self.rotation.T

    def subitem_scores(self, seq_emb: torch.Tensor) -> torch.Tensor:
        return super().subitem_scores(seq_emb @ self.rotation)


def finetune(embedding: PQEmbedding, loss_fn: Callable[[], torch.Tensor], steps: int, *, lr: float = 1e-3,
             progress: bool = False) -> list[float]:
    """A short fine-tuning of ``embedding.subitem_embeddings`` alone (codes fixed; the rest of the
    model is not updated even if ``loss_fn`` backpropagates into it).

    ``loss_fn()`` computes the model's own training loss on its next batch. Returns the losses.
    """
    if not isinstance(embedding, PQEmbedding):
        raise TypeError(f"embedding must be a recjpq.nn.PQEmbedding, got {type(embedding).__name__}")
    _check_positive_int("steps", steps)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be a callable returning a scalar loss tensor")
    param = embedding.subitem_embeddings
    optimizer = torch.optim.Adam([param], lr=lr)
    losses = []
    bar = tqdm(range(steps), desc="fine-tune sub-items", disable=not progress, leave=False)
    for _ in bar:
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        optimizer.zero_grad(set_to_none=True)
        param.grad = torch.autograd.grad(loss, param)[0]
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses
