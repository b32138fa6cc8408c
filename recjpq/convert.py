"""Product quantisation of an already trained item table, so a dense model can score through recjpq.

``quantize`` turns an ``[N, d]`` item matrix into codes ``[N, M]`` and sub-item centroids
``[M, K, d / M]`` (the ``PQEmbedding`` layout): k-means per sub-space (Lloyd's algorithm in
PyTorch, on the weight's device), or the cheaper ``"svd"`` binning. ``rotate=True`` first learns
an orthogonal rotation (OPQ, Ge et al. 2013: principal directions dealt over the splits, then
alternating k-means and Procrustes) that balances the sub-spaces; it lowers the reconstruction
error most when a few directions carry most of the variance. ``metric=Sigma`` (the queries'
second moment, ``query_metric``) quantises for the score error ``q . (e - e_hat)`` instead of
``||e - e_hat||``: k-means in the ``Sigma^(1/2)`` space, what matters for ranking. ``distill``
fine-tunes the result with the dense model as teacher; ``finetune`` trains the sub-item
embeddings with the model's own loss while the codes stay fixed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recjpq.codes.assign import codes_dtype
from recjpq.data.split import batches, pad_left
from recjpq.nn.pq_embedding import PQEmbedding

METHODS = ("kmeans", "svd")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def valid_num_splits(dim: int) -> list[int]:
    """The M that divide an embedding of size ``dim`` (what ``quantize`` accepts)."""
    return [m for m in range(1, dim + 1) if dim % m == 0]


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


def _unique_rows(x: torch.Tensor, codes: torch.Tensor, centroids: torch.Tensor, skip: int | None,
                 generator: torch.Generator) -> torch.Tensor:
    """Codes ``[N, M]`` int64 in which no two items (``skip`` aside) share all M sub-ids, when
    K^M allows it: an item whose row an earlier item already holds moves to the free row that
    raises its squared reconstruction error least (one split moved to another centroid; failing
    that, the next free row in mixed-radix order from a random start). Items that share a row
    would always tie in every ranking. ``x`` ``[M, N, dsub]`` are the sub-vectors the codes encode.
    """
    num_items, num_splits = codes.shape
    num_codes = centroids.shape[1]
    keep = torch.ones(num_items, dtype=torch.bool, device=codes.device)
    if skip is not None:
        keep[skip] = False
    if num_codes ** num_splits < int(keep.sum()):
        return codes
    ids = keep.nonzero().squeeze(1)
    _, inverse = torch.unique(codes[ids], dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(ids), device=codes.device).scatter_reduce(
        0, inverse, torch.arange(len(ids), device=codes.device), "amin")
    moved = ids[first[inverse] != torch.arange(len(ids), device=codes.device)]
    if not len(moved):
        return codes
    codes = codes.clone()
    taken = set(map(tuple, codes[ids].tolist()))
    dist = (x[:, moved].unsqueeze(2) - centroids.unsqueeze(1)).square().sum(-1)  # [M, D, K]
    cost = dist - dist.gather(2, codes[moved].T.unsqueeze(2))  # extra error of each single move
    for j, item in enumerate(moved.tolist()):
        row = codes[item].tolist()
        for flat in cost[:, j].flatten().argsort().tolist():
            m, k = divmod(flat, num_codes)
            candidate = tuple(row[:m] + [k] + row[m + 1:])
            if k != row[m] and candidate not in taken:
                break
        else:
            total = num_codes ** num_splits
            start = int(torch.randint(0, 1 << 62, (1,), generator=generator)) % total
            for step in range(total):
                value, digits = (start + step) % total, []
                for _ in range(num_splits):
                    value, digit = divmod(value, num_codes)
                    digits.append(digit)
                candidate = tuple(reversed(digits))
                if candidate not in taken:
                    break
        taken.add(candidate)
        codes[item] = torch.tensor(candidate, device=codes.device)
    return codes


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


def query_metric(queries: torch.Tensor) -> torch.Tensor:
    """``E[q q^T]`` ``[d, d]`` of query vectors ``[n, d]`` (sequence states): the matrix for which
    ``delta^T Sigma delta`` is the mean squared score error ``q . delta`` over these queries
    (``quantize``'s ``metric``)."""
    if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[0] == 0 or \
            not queries.is_floating_point():
        raise ValueError(f"queries must be a non-empty floating [n, d] tensor, got "
                         f"{getattr(queries, 'shape', type(queries).__name__)}")
    q = queries.detach().double()
    return (q.T @ q / q.shape[0]).to(queries.dtype)


def _metric_roots(metric: torch.Tensor, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Sigma^(1/2), Sigma^(-1/2))`` of a symmetric PSD ``[d, d]`` metric, eigenvalues floored at
    1e-6 of the largest so the inverse root stays finite on a rank-deficient one."""
    if not isinstance(metric, torch.Tensor) or metric.shape != (dim, dim) or not metric.is_floating_point():
        raise ValueError(f"metric must be a floating [{dim}, {dim}] tensor, got "
                         f"{getattr(metric, 'shape', type(metric).__name__)}")
    m = metric.detach().double().to(device)
    if not bool(torch.isfinite(m).all()) or not torch.allclose(m, m.T, rtol=1e-4, atol=1e-6 * float(m.abs().max())):
        raise ValueError("metric must be a finite symmetric matrix")
    m = (m + m.T) / 2
    values, vectors = torch.linalg.eigh(m)
    if float(values[-1]) <= 0 or float(values[0]) < -1e-6 * float(values[-1]):
        raise ValueError("metric must be positive semi-definite with a positive eigenvalue")
    values = values.clamp(min=1e-6 * float(values[-1]))
    root = (vectors * values.sqrt()) @ vectors.T
    inverse = (vectors * values.rsqrt()) @ vectors.T
    return root.float(), inverse.float()


def quantize(weight: torch.Tensor, num_splits: int, num_codes: int = 256, method: str = "kmeans", *,
             iters: int = 25, rotate: bool = False, opq_iters: int = 10, train_size: int | None = None,
             padding_idx: int | None = None, unique: bool = True, metric: torch.Tensor | None = None, seed: int = 0,
             progress: bool = False):
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
        unique: give every item (the padding row aside) its own code row when K^M allows it
            (an item whose nearest row is taken moves to the free row closest to it), so no two
            items always tie.
        metric: ``[d, d]`` symmetric positive semi-definite matrix Sigma (``query_metric(queries)``:
            the queries' second moment ``E[q q^T]``): minimise ``(e - e_hat)^T Sigma (e - e_hat)``,
            the mean squared *score* error ``E[(q . (e - e_hat))^2]`` over those queries, instead of
            ``||e - e_hat||^2``. The table is quantised as ``e @ Sigma^(1/2)`` (then OPQ inside that
            space with ``rotate``) and mapped back through the returned ``rotation``, which is then
            not orthogonal.
        progress: tqdm bars for the OPQ and k-means rounds and the final assignment.

    Returns:
        ``(codes [N, M], centroids [M, K, d / M])``, codes in the narrowest dtype for K; with
        ``rotate=True`` or a ``metric`` also ``rotation [d, d]``: item i is approximated by
        ``decode(codes[i]) @ rotation.T``, so a query q scores ``(q @ rotation)`` against the codes
        (orthogonal for OPQ alone; ``Sigma^(-1/2) @ opq_rotation`` with a metric).
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
        raise ValueError(f"the embedding dim {dim} must be divisible by num_splits={num_splits}; "
                         f"valid num_splits for d={dim}: {', '.join(map(str, valid_num_splits(dim)))}")
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
    unwhiten = None
    if metric is not None:
        whiten, unwhiten = _metric_roots(metric, dim, x.device)
        x = x @ whiten
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
    if unwhiten is not None:
        rotation = unwhiten if rotation is None else unwhiten @ rotation
    x = _split(x, num_splits)
    codes = _nearest(x, centroids, progress).T
    if unique:
        codes = _unique_rows(x, codes, centroids, padding_idx, generator)
    codes = codes.to(codes_dtype(num_codes)).contiguous()
    centroids = centroids.to(weight.dtype).contiguous()
    return (codes, centroids) if rotation is None else (codes, centroids, rotation.to(weight.dtype))


class RotatedPQEmbedding(PQEmbedding):
    """A ``PQEmbedding`` quantised in a transformed space: embeddings are ``decode(codes) @ rotation.T``
    and queries are multiplied by ``rotation`` before the sub-item scores, so scores stay inner
    products in the original space while every op (``score``, ``score_all``, ``topk``) is unchanged.
    ``rotation`` is orthogonal for OPQ and a general invertible matrix for a query metric
    (``quantize(..., metric=)``); nothing here assumes either."""

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


class _DistillLoss(torch.autograd.Function):
    """Per-row ``(1 - alpha) * CE(z, target) + alpha * T^2 * KL(softmax(zt / T) || softmax(z / T))``
    with student logits ``z = h @ W.T`` and teacher logits ``zt = ht @ Wt.T`` over all N rows,
    streamed over item chunks (online log-sum-exps) so memory is O(B x chunk), never B x N.
    The backward pass recomputes each chunk's logits: ``dz = (1 - alpha) (p - onehot) +
    alpha T (p_T - pt_T)``."""

    @staticmethod
    def forward(ctx, h, weight, teacher_h, teacher_weight, targets, alpha: float, temperature: float, chunk: int):
        scale = 1.0 / temperature
        rows = h.shape[0]
        lse = h.new_full((rows,), float("-inf"))  # student, T = 1
        lse_t = lse.clone()  # student at T
        lse_teacher = lse.clone()  # teacher at T
        # running sums of exp(zt - lse_teacher_so_far) * student logit / * teacher logit (both at T)
        cross, self_term = h.new_zeros(rows), h.new_zeros(rows)
        for start in range(0, weight.shape[0], chunk):
            z = h @ weight[start:start + chunk].T
            zt = (teacher_h @ teacher_weight[start:start + chunk].T) * scale
            lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
            if temperature != 1.0:
                lse_t = torch.logaddexp(lse_t, torch.logsumexp(z * scale, 1))
            new = torch.logaddexp(lse_teacher, torch.logsumexp(zt, 1))
            rescale = torch.exp(lse_teacher - new)
            p = torch.exp(zt - new.unsqueeze(1))
            cross = cross * rescale + (p * z).sum(1) * scale
            self_term = self_term * rescale + (p * zt).sum(1)
            lse_teacher = new
        if temperature == 1.0:
            lse_t = lse
        target_logit = (h * weight[targets]).sum(1)
        kl = self_term - lse_teacher - cross + lse_t
        ctx.save_for_backward(h, weight, teacher_h, teacher_weight, targets, lse, lse_t, lse_teacher)
        ctx.args = (alpha, temperature, chunk)
        return (1.0 - alpha) * (lse - target_logit) + alpha * temperature ** 2 * kl

    @staticmethod
    def backward(ctx, grad):
        h, weight, teacher_h, teacher_weight, targets, lse, lse_t, lse_teacher = ctx.saved_tensors
        alpha, temperature, chunk = ctx.args
        scale = 1.0 / temperature
        grad = grad.contiguous()
        dh = torch.zeros_like(h)
        dweight = torch.zeros_like(weight)
        for start in range(0, weight.shape[0], chunk):
            w = weight[start:start + chunk]
            z = h @ w.T
            pt = torch.exp((teacher_h @ teacher_weight[start:start + chunk].T) * scale - lse_teacher.unsqueeze(1))
            dz = (1.0 - alpha) * torch.exp(z - lse.unsqueeze(1))
            dz += (alpha * temperature) * (torch.exp(z * scale - lse_t.unsqueeze(1)) - pt)
            dz *= grad.unsqueeze(1)
            dh += dz @ w
            dweight[start:start + chunk] = dz.T @ h
        target_grad = (-(1.0 - alpha)) * grad.unsqueeze(1)
        dh += target_grad * weight[targets]
        dweight.index_add_(0, targets, target_grad * h)
        return dh, dweight, None, None, None, None, None, None


def distillation_loss(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor, teacher_weight: torch.Tensor,
                      targets: torch.Tensor, *, alpha: float = 0.5, temperature: float = 1.0,
                      chunk: int = 2048) -> torch.Tensor:
    """Mean over rows of ``(1 - alpha) * CE(h @ weight.T, targets) + alpha * T^2 *
    KL(softmax(teacher_h @ teacher_weight.T / T) || softmax(h @ weight.T / T))``: the task loss
    plus distillation of the teacher's full-catalogue score distribution.

    Streams over ``chunk`` items at a time (O(B x chunk) memory, no B x N logits or gradients);
    differentiable in ``h [B, d]`` and ``weight [N, d]`` (a PQ table decoded with ``PQEmbedding.weight``
    passes its gradient on to the sub-item embeddings). ``targets [B]`` index rows of ``weight``.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h [B, d] and weight [N, d] must agree in d, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if teacher_h.shape[0] != h.shape[0] or teacher_h.shape[1] != teacher_weight.shape[1] or \
            teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher_h {tuple(teacher_h.shape)} / teacher_weight {tuple(teacher_weight.shape)} do not "
                         f"match h {tuple(h.shape)} / weight {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"targets must be [B={h.shape[0]}], got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must index rows of weight in [0, {weight.shape[0]})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    _check_positive_int("chunk", chunk)
    losses = _DistillLoss.apply(h.float(), weight.float(), teacher_h.detach().float(),
                                teacher_weight.detach().float(), targets.long(), float(alpha), float(temperature),
                                chunk)
    return losses.mean()


@dataclass
class DistillResult:
    """What ``distill`` did: the installed table, the seconds quantisation took, the optimiser
    steps taken, the seconds of the whole conversion (quantisation included, callbacks excluded)
    the loss of every step and, with ``reassign_every``, how many items changed codes at each
    reassignment."""

    embedding: PQEmbedding
    quantize_seconds: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    reassigned: list[int] = field(default_factory=list)


def _training_inputs(model: nn.Module, style: str, rows: list[np.ndarray], max_len: int, rng: np.random.Generator):
    """A batch of training sequences as the model reads them, and the item id each position
    predicts (0 where none)."""
    device = next(model.parameters()).device
    if style == "recjpq":
        causal = model.config["model"] != "bert4rec"
        seqs = pad_left(rows, model.batch_width(rows, max_len + causal)).to(device)
        return model.training_example(seqs, rng)
    seqs = pad_left(rows, max_len + 1)  # sasrec.pytorch: numpy left-padded log_seqs
    return seqs[:, :-1].numpy(), seqs[:, 1:].to(device)


def _states(model: nn.Module, style: str, inputs) -> torch.Tensor:
    """The model's sequence state at every position ``[B, L, d]``."""
    return model.encode(inputs) if style == "recjpq" else model.log2feats(inputs)


def _sequence_states(model: nn.Module, teacher: nn.Module, style: str, rows: list[np.ndarray], max_len: int,
                     rng: np.random.Generator):
    """Student and teacher states ``[T, d]`` at every position of a batch of training sequences
    that has a next item, and those next items ``[T]`` (ids)."""
    inputs, targets = _training_inputs(model, style, rows, max_len, rng)
    hidden = _states(model, style, inputs)
    with torch.no_grad():
        teacher_hidden = _states(teacher, style, inputs)
    has_target = targets != 0
    return hidden[has_target], teacher_hidden[has_target], targets[has_target]


def _model_max_len(model: nn.Module, style: str, max_len: int | None) -> int:
    if max_len is None:
        if style != "recjpq":
            raise ValueError("max_len (the sequence length the model was trained with) is required for "
                             f"{style}-style models")
        max_len = model.config["max_len"]
    _check_positive_int("max_len", max_len)
    return max_len


def _learnable(data: Sequence[np.ndarray]) -> list[np.ndarray]:
    train = [np.asarray(s, dtype=np.int64) for s in data if len(s) >= 2]
    if not train:
        raise ValueError("data has no sequence of two or more items to learn from")
    return train


def training_queries(model: nn.Module, data: Sequence[np.ndarray], *, max_len: int | None = None,
                     num_sequences: int = 8192, batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """The model's sequence states ``[T, d]`` (eval mode, no gradient) at every training position
    of up to ``num_sequences`` random sequences of ``data`` (item-id arrays, oldest first): the
    queries it scores items for, e.g. ``quantize(w, M, rotate=True, metric=query_metric(
    training_queries(model, data)))``. ``recjpq.models`` or SASRec.pytorch-style models (``max_len``
    as for ``distill``)."""
    from recjpq.patch import detect_style

    style = detect_style(model)
    if style == "recbole":
        raise ValueError("training_queries needs states at every position: recjpq.models or SASRec.pytorch-style")
    max_len = _model_max_len(model, style, max_len)
    _check_positive_int("num_sequences", num_sequences)
    _check_positive_int("batch_size", batch_size)
    train = _learnable(data)
    rng = np.random.default_rng(seed)
    picked = rng.permutation(len(train))[:num_sequences]
    out, was_training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(picked), batch_size):
                inputs, targets = _training_inputs(model, style, [train[j] for j in picked[start:start + batch_size]],
                                                   max_len, rng)
                out.append(_states(model, style, inputs)[targets != 0])
    finally:
        model.train(was_training)
    return torch.cat(out)


def _reassign_codes(pq: PQEmbedding, teacher_weight: torch.Tensor, generator: torch.Generator) -> int:
    """Give every item the (unique) code row whose decoded vector under the current sub-items is
    nearest its teacher vector ``teacher_weight [N, d]`` (padding row aside), in the space the table
    was quantised in (``teacher @ rotation^-T``: L2 there is the quantiser's metric). Returns how
    many items changed codes."""
    with torch.no_grad():
        target = teacher_weight.float()
        if isinstance(pq, RotatedPQEmbedding):
            target = torch.linalg.solve(pq.rotation, target.T).T  # e @ R^-T, row by row
        x = _split(target, pq.num_splits)
        centroids = pq.subitem_embeddings.detach().float()
        codes = _nearest(x, centroids).T
        codes = _unique_rows(x, codes, centroids, pq.padding_idx, generator)
        if pq.padding_idx is not None:
            codes[pq.padding_idx] = pq.codes[pq.padding_idx].long()
        changed = int((codes != pq.codes.long()).any(1).sum())
        pq.codes.copy_(codes.to(pq.codes.dtype))
    return changed


def distill(model: nn.Module, data: Sequence[np.ndarray], num_splits: int, num_codes: int = 256, *,
            steps: int | None = None, time_limit: float | None = None, epochs: int | None = None,
            batch_size: int = 128, lr: float = 2e-3, alpha: float = 0.5, temperature: float = 1.0,
            train_encoder: bool = False, encoder_lr: float = 1e-4, max_len: int | None = None,
            chunk: int = 2048, metric: str | torch.Tensor | None = None, metric_sequences: int = 8192,
            reassign_every: int | None = None, seed: int = 0, clock: str = "wall",
            callback: Callable[[int, float], None] | None = None, callback_every: int = 100, progress: bool = True,
            **quantize_kwargs) -> DistillResult:
    """Convert a trained dense model to PQ in place and fine-tune it with itself as the teacher.

    ``model`` is patched with ``recjpq.patch.patch_item_scoring`` (``quantize_kwargs``: method,
    rotate, iters, ... go to ``quantize``); a frozen copy of the dense model is the teacher. Then,
    on the user's training sequences ``data`` (item-id arrays, oldest first, 0 = padding), every
    position with a next item contributes ``distillation_loss``: ``(1 - alpha)`` x the task's
    full-softmax CE plus ``alpha`` x the KL divergence from the teacher's full-catalogue score
    distribution at ``temperature``, over all items except the padding row, streamed in
    ``chunk``-item tiles. The sub-item embeddings train (Adam, ``lr``; codes fixed); with
    ``train_encoder`` the rest of the model too (``encoder_lr``), else it runs in eval mode.

    ``metric="queries"`` quantises for the teacher's own queries: ``quantize``'s ``metric`` is
    ``query_metric(training_queries(teacher, data, num_sequences=metric_sequences))``, so the
    codes minimise the score error ``q . (e - e_hat)`` rather
    than ``||e - e_hat||`` (combine with ``rotate=True``: OPQ inside that space); a ``[d, d]``
    tensor is passed on as it is.

    ``reassign_every``: every so many steps, each item takes the code row that best reconstructs
    its teacher vector under the sub-items trained so far (in the quantiser's metric, rows kept
    unique), so codes are not frozen at their k-means values.

    Stops after ``steps`` optimiser steps, ``time_limit`` seconds (of the whole conversion,
    quantisation included) or ``epochs`` passes, whichever comes first (one epoch if none is
    given); ``clock="cpu"`` counts this process's CPU seconds instead of wall seconds (on a shared
    machine, the time the conversion would take alone with the same threads). ``callback(step, seconds)`` runs right after quantisation (step 0), every
    ``callback_every`` steps and at the end, with the model in eval mode (e.g. a validation for a
    quality-vs-time curve); its time is not counted. ``max_len``: the sequence length the model reads (default
    ``model.config["max_len"]`` for ``recjpq.models``; required for SASRec.pytorch-style models).
    RecBole-style models (one state per sequence) are not supported here: use ``finetune``.
    Returns a ``DistillResult``; the model is left in eval mode.
    """
    from recjpq.patch import detect_style, patch_item_scoring

    style = detect_style(model)
    if style == "recbole":
        raise ValueError("distill supports recjpq.models and SASRec.pytorch-style models (states at every "
                         "position); for a RecBole-style model use patch_item_scoring + finetune with its own loss")
    max_len = _model_max_len(model, style, max_len)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("callback_every", callback_every)
    _check_positive_int("metric_sequences", metric_sequences)
    if reassign_every is not None:
        _check_positive_int("reassign_every", reassign_every)
    if isinstance(metric, str) and metric != "queries":
        raise ValueError(f'metric must be "queries", a [d, d] tensor or None, got {metric!r}')
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            _check_positive_int(name, value)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if steps is None and time_limit is None and epochs is None:
        epochs = 1
    train = _learnable(data)

    start = now()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if isinstance(metric, str):
        metric = query_metric(training_queries(teacher, train, max_len=max_len, num_sequences=metric_sequences,
                                               batch_size=batch_size, seed=seed))
    if metric is not None:
        quantize_kwargs["metric"] = metric
    pq = patch_item_scoring(model, num_splits, num_codes, seed=seed, **quantize_kwargs)
    result = DistillResult(pq, quantize_seconds=now() - start)
    teacher_table = teacher.item_emb if style == "sasrec.pytorch" else teacher.item_embedding
    items = torch.arange(pq.num_embeddings, device=pq.codes.device)
    if pq.padding_idx is not None:
        items = items[items != pq.padding_idx]
    # row of each item id in the padding-free tables (-1 for padding, which is never a target)
    row_of = torch.full((pq.num_embeddings,), -1, dtype=torch.int64, device=items.device)
    row_of[items] = torch.arange(len(items), device=items.device)
    teacher_weight = teacher_table.weight.detach()[items]

    frozen = [p for p in model.parameters() if p is not pq.subitem_embeddings and p.requires_grad]
    groups = [{"params": [pq.subitem_embeddings], "lr": lr}]
    if train_encoder:
        groups.append({"params": frozen, "lr": encoder_lr})
    else:
        for p in frozen:
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(groups)
    model.train(train_encoder)
    rng = np.random.default_rng(seed)
    reassign_generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"distil M={num_splits}", disable=not progress, leave=False)
    spent, epoch = now() - start, 0
    done = time_limit is not None and spent >= time_limit
    try:
        if callback is not None:
            model.eval()
            callback(0, spent)
            model.train(train_encoder)
        while not done:
            epoch += 1
            for idx in batches(len(train), batch_size, rng):
                start = now()
                hidden, teacher_hidden, targets = _sequence_states(model, teacher, style, [train[j] for j in idx],
                                                                   max_len, rng)
                loss = distillation_loss(hidden, pq.weight[items], teacher_hidden, teacher_weight,
                                         row_of[targets], alpha=alpha, temperature=temperature, chunk=chunk)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                result.steps += 1
                if reassign_every is not None and result.steps % reassign_every == 0:
                    result.reassigned.append(_reassign_codes(pq, teacher_table.weight.detach(), reassign_generator))
                spent += now() - start
                result.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", seconds=f"{spent:.0f}")
                done = ((steps is not None and result.steps >= steps)
                        or (time_limit is not None and spent >= time_limit))
                if done:
                    break
                if callback is not None and result.steps % callback_every == 0:
                    model.eval()
                    callback(result.steps, spent)
                    model.train(train_encoder)
            done = done or (epochs is not None and epoch >= epochs)
        if callback is not None and result.steps % callback_every:
            model.eval()
            callback(result.steps, spent)
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
    result.seconds = spent
    return result
