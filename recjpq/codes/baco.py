"""BACO: balanced co-clustering of users and items by label propagation.

Our reconstruction of Jiang, Yang & Wu, "Balanced Co-Clustering of Users and Items for Embedding
Table Compression" (SIGIR 2026; code not public, see ``shared/docs/baco.md``). Users and items share
cluster labels; each label is one embedding row, so similar users and items share parameters.

Objective, with node weights ``w_v = deg(v) ** alpha`` and per-side cluster weights
``W_X(c) = sum(w_v for v in X with label c)``::

    J = sum_{(u, i) in E} B_ui [l_u == l_i]  -  gamma / 2 * sum_c (W_U(c)^2 + W_I(c)^2)

The first term counts intra-cluster edges, the second penalises unequal cluster weights
(``alpha = 1`` with ``gamma = resolution / |E|`` is bipartite modularity; ``alpha = 0`` is size
balance). We balance each side on its own because users and items get separate tables: every row of
both must be used. A sweep updates one side at a time (users share no edges, so their updates do
not interact through the first term): node v moves to ``argmax_c A(v, c) - gamma w_v (W(c) - w_v
[c == l_v])``, ``A(v, c)`` being v's edge weight into label c. A random fraction of nodes may move
per sweep (no stampede into the lightest cluster), and moves are accepted only while every
cluster's weight stays within ``[1 - slack, 1 + slack]`` times the mean (hard capacities), so no
cluster collapses or empties. A sweep costs O(|E| log |E|) (sorted label counts) or, when
``nodes x clusters`` is small, O(|E| + nodes x clusters) with chunked dense counts.

Secondary user clusters cluster the residual graph (edges the primary clustering leaves between
clusters), so a user's second row describes the interests its primary row misses; a user's
embedding is the sum of both rows (``recjpq.nn.ClusterEmbedding``).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Callable, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from recjpq._threading import one_torch_thread

_DENSE_BUDGET = 1 << 22  # elements of one dense count chunk (16 MiB of float32)


class CoClusters(NamedTuple):
    """Cluster ids (int64) of a co-clustering; ``secondary_user_clusters`` is None when not asked for."""

    user_clusters: torch.Tensor
    item_clusters: torch.Tensor
    secondary_user_clusters: torch.Tensor | None
    num_clusters: int
    num_secondary: int


class _Side:
    """One side of the bipartite graph: its nodes' edges in CSR order and node weights;
    ``from_users`` (item side) holds each edge's position in the user side's order."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, wt: torch.Tensor, num_nodes: int, alpha: float,
                 from_users: torch.Tensor | None = None):
        self.src, self.dst, self.wt, self.num_nodes, self.from_users = src, dst, wt, num_nodes, from_users
        degree = torch.zeros(num_nodes, dtype=torch.float64, device=src.device).index_add_(0, src, wt.double())
        self.weight = degree.pow(alpha) if alpha else torch.ones_like(degree)  # 0 ** 0 == 1: isolated nodes count 1
        self.indptr = torch.cat([src.new_zeros(1), torch.bincount(src, minlength=num_nodes).cumsum(0)])




def _total(x: torch.Tensor) -> float:
    """Sum in float64 in a fixed (sequential) order: ``Tensor.sum`` splits its reduction by thread count."""
    return float(x.double().cumsum(0)[-1]) if x.numel() else 0.0


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _ids(name: str, x, device) -> torch.Tensor:
    x = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else np.asarray(x), device=device)
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.numel() and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.long()


def _edges(interactions, num_users: int | None, num_items: int | None, device):
    """Validated, de-duplicated edges ``(users, items, weights)`` sorted by user, plus the side sizes.

    ``interactions``: ``(user_ids, item_ids)``, a scipy sparse or a torch sparse user x item matrix.
    Repeated pairs add up into the edge weight.
    """
    if sp.issparse(interactions):
        coo = sp.coo_matrix(interactions)
        users, items = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
        weights = torch.from_numpy(coo.data.astype(np.float32))
        num_users = coo.shape[0] if num_users is None else num_users
        num_items = coo.shape[1] if num_items is None else num_items
        if coo.shape != (num_users, num_items):
            raise ValueError(f"interactions matrix has shape {coo.shape}, expected ({num_users}, {num_items})")
    elif isinstance(interactions, torch.Tensor) and interactions.layout != torch.strided:
        mat = interactions.coalesce() if interactions.layout == torch.sparse_coo else interactions.to_sparse_coo()
        users, items = mat.indices()
        weights = mat.values().float()
        num_users = mat.shape[0] if num_users is None else num_users
        num_items = mat.shape[1] if num_items is None else num_items
        if tuple(mat.shape) != (num_users, num_items):
            raise ValueError(f"interactions matrix has shape {tuple(mat.shape)}, expected ({num_users}, {num_items})")
    elif isinstance(interactions, (tuple, list)) and len(interactions) == 2:
        users, items = _ids("user_ids", interactions[0], device), _ids("item_ids", interactions[1], device)
        if users.shape != items.shape:
            raise ValueError(f"user_ids and item_ids differ in length: {users.numel()} vs {items.numel()}")
        weights = torch.ones(users.shape, dtype=torch.float32, device=users.device)
    else:
        raise TypeError("interactions must be a pair (user_ids, item_ids) or a scipy / torch sparse "
                        f"user x item matrix, got {type(interactions).__name__}")
    device = users.device if device is None else torch.device(device)
    users, items, weights = users.to(device), items.to(device), weights.to(device)
    if users.numel() == 0:
        raise ValueError("interactions is empty: co-clustering needs at least one (user, item) edge")
    for name, ids, size in (("user_ids", users, num_users), ("item_ids", items, num_items)):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (size is not None and hi >= size):
            bound = "" if size is None else f", {size}"
            raise ValueError(f"{name} must lie in [0{bound}), got values in [{lo}, {hi}]")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("interaction weights must be finite and >= 0")
    num_users = int(users.max()) + 1 if num_users is None else _check_count("num_users", num_users, 1)
    num_items = int(items.max()) + 1 if num_items is None else _check_count("num_items", num_items, 1)
    key, inverse = torch.unique(users * num_items + items, return_inverse=True)  # sorted: CSR by user
    summed = torch.zeros(key.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, weights)
    return key // num_items, key % num_items, summed, num_users, num_items


def _sides(users, items, weights, num_users, num_items, alpha):
    by_item = torch.argsort(items * num_users + users)
    return (_Side(users, items, weights, num_users, alpha),
            _Side(items[by_item], users[by_item], weights[by_item], num_items, alpha, from_users=by_item))


def _best_labels_dense(side: _Side, own, other, load, gamma, k):
    """Per node: best label and its gain over staying, from chunked dense ``[rows, k]`` counts."""
    n = side.num_nodes
    best = torch.empty_like(own)
    gain = torch.empty(n, dtype=torch.float64, device=own.device)
    rows = max(1, _DENSE_BUDGET // k)
    bounds = side.indptr[::rows].tolist() + [side.indptr[-1].item()]
    for chunk, start in enumerate(range(0, n, rows)):
        stop = min(n, start + rows)
        e0, e1 = bounds[chunk], bounds[chunk + 1]
        flat = (side.src[e0:e1] - start) * k + other[side.dst[e0:e1]]
        counts = torch.zeros((stop - start) * k, dtype=torch.float64, device=own.device)
        counts.index_add_(0, flat, side.wt[e0:e1].double())
        w = side.weight[start:stop]
        score = counts.view(-1, k) - (gamma * w)[:, None] * load[None, :]
        mine = own[start:stop, None]
        score.scatter_add_(1, mine, (gamma * w * w)[:, None])  # a node's own weight is not competition
        pick = score.argmax(1, keepdim=True)  # first maximum: ties go to the lower label
        best[start:stop] = pick.squeeze(1)
        gain[start:stop] = (score.gather(1, pick) - score.gather(1, mine)).squeeze(1)
    return best, gain


def _best_labels_sparse(side: _Side, own, other, load, gamma, k):
    """As ``_best_labels_dense`` in O(|E|) memory: candidates are the neighbours' labels, the node's
    own label and the lightest cluster (the best label with no edges)."""
    n, dev = side.num_nodes, own.device
    key, inverse = torch.unique(side.src * k + other[side.dst], return_inverse=True)
    affinity = torch.zeros(key.numel(), dtype=torch.float64, device=dev).index_add_(0, inverse, side.wt.double())
    arange = torch.arange(n, device=dev)
    node = torch.cat([key // k, arange, arange])
    label = torch.cat([key % k, own, torch.full_like(own, int(torch.argmin(load)))])
    affinity = torch.cat([affinity, affinity.new_zeros(2 * n)])
    w = side.weight[node]
    score = affinity - gamma * w * (load[label] - w * (label == own[node]))
    top = torch.full((n,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce_(0, node, score, "amax")
    stay = torch.full_like(top, -math.inf).scatter_reduce_(0, node, score.masked_fill(label != own[node], -math.inf),
                                                           "amax")
    tied = torch.where(score == top[node], label, k)
    best = torch.full_like(own, k).scatter_reduce_(0, node, tied, "amin")  # ties go to the lower label
    return best, top - stay


def _fits(group, weight, room, k):
    """Movers (given in decreasing gain) that fit: per group, the leading ones whose weights add up
    to at most ``room[group]``."""
    order = torch.argsort(group, stable=True)  # stable: decreasing gain within each group
    g, w = group[order], weight[order]
    before = w.cumsum(0) - w  # weight of earlier movers, over all groups
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    base = torch.zeros(k, dtype=w.dtype, device=w.device).scatter_(0, g[first], before[first])
    fits = torch.empty_like(first)
    fits[order] = before - base[g] + w <= room[g] * (1.0 + 1e-9) + 1e-9
    return fits


def _accept(src, dst, gain, weight, load, lo, hi, k, rounds: int = 3):
    """A high-gain subset of the proposed moves ``src -> dst`` that keeps every cluster's weight
    within ``[min(lo, load), max(hi, load)]`` (a move never worsens an imbalance).

    Round 1 lets each cluster take in up to its free room and give away down to its floor. Later
    rounds only trade: a cluster takes in at most the weight that left it in the round before and
    gives away at most the weight that entered it, so every round keeps the bounds, with no
    fixed-point search.
    """
    order = torch.argsort(-gain, stable=True)
    src, dst, weight = src[order], dst[order], weight[order]
    accepted = torch.zeros_like(src, dtype=torch.bool)
    room_in, room_out = (hi - load).clamp_min(0.0), (load - lo).clamp_min(0.0)
    for _ in range(rounds):
        idx = (~accepted).nonzero().squeeze(1)
        ok = _fits(dst[idx], weight[idx], room_in, k) & _fits(src[idx], weight[idx], room_out, k)
        new = idx[ok]
        if new.numel() == 0:
            break
        accepted[new] = True
        room_in = torch.zeros_like(load).index_add_(0, src[new], weight[new])
        room_out = torch.zeros_like(load).index_add_(0, dst[new], weight[new])
    result = torch.empty_like(accepted)
    result[order] = accepted
    return result


def _sweep(side: _Side, own, other, k, gamma, slack, fraction, generator, min_room: float = 0.0):
    """One balanced label-propagation step of one side, in place on ``own``; returns the moves made.

    Cluster weights stay within ``mean -/+ max(slack * mean, min_room)`` (``min_room`` is an absolute
    floor, so that small clusters can still trade nodes), never below one node's weight where the
    mean allows it, and never above what the heaviest node needs alone."""
    load = torch.zeros(k, dtype=torch.float64, device=own.device).index_add_(0, own, side.weight)
    dense = side.num_nodes * k <= 4 * side.src.numel() + _DENSE_BUDGET
    best, gain = (_best_labels_dense if dense else _best_labels_sparse)(side, own, other, load, gamma, k)
    draw = torch.rand(side.num_nodes, generator=generator).to(own.device)
    movers = ((best != own) & (gain > 1e-9) & (draw < fraction)).nonzero().squeeze(1)
    if movers.numel() == 0:
        return 0
    if math.isinf(slack):  # an unbalanced side: every improving move stands
        own[movers] = best[movers]
        return movers.numel()
    mean = _total(side.weight) / k
    room = max(slack * mean, min(min_room, mean))
    heaviest = float(side.weight.max())
    hi = max(mean + room, heaviest)  # a node heavier than the mean fills a cluster alone
    lo = max(mean - room, min(heaviest, math.floor(mean / heaviest) * heaviest))  # no cluster emptied
    ok = _accept(own[movers], best[movers], gain[movers], side.weight[movers], load, lo, hi, k)
    own[movers[ok]] = best[movers[ok]]
    return int(ok.sum())


def _balanced_labels(n, k, generator, device):
    """Random labels with equal counts (up to one)."""
    return (torch.randperm(n, generator=generator) % k).to(device)


def _item_spectrum(side: _Side, num_users: int, rank: int, generator, power_iters: int = 2):
    """Top ``rank`` item singular vectors ``[num_items, rank]`` of the degree-normalised biadjacency
    (randomised range finder, sparse ops only).

    Runs on one thread: BLAS, LAPACK and sparse products order their float reductions by thread
    count, and these values are argsorted into labels, where a last-bit difference would reorder
    near-equal items."""
    # float reductions whose order follows the thread count (BLAS, LAPACK, sparse products) feed
    # argsorts: one thread gives the same labels for any thread count
    with one_torch_thread():
        return _item_spectrum_unthreaded(side, num_users, rank, generator, power_iters)


def _item_spectrum_unthreaded(side: _Side, num_users: int, rank: int, generator, power_iters: int):
    dev = side.src.device
    deg = torch.zeros(side.num_nodes, device=dev).index_add_(0, side.src, side.wt)
    udeg = torch.zeros(num_users, device=dev).index_add_(0, side.dst, side.wt)
    vals = side.wt * (deg[side.src] * udeg[side.dst]).clamp_min(1e-12).rsqrt()
    mat = torch.sparse_coo_tensor(torch.stack([side.src, side.dst]), vals, (side.num_nodes, num_users),
                                  check_invariants=False).coalesce()
    width = min(rank + 8, side.num_nodes, num_users)
    basis = torch.linalg.qr(torch.sparse.mm(mat, torch.randn(num_users, width, generator=generator).to(dev)))[0]
    for _ in range(power_iters):
        basis = torch.linalg.qr(torch.sparse.mm(mat, torch.sparse.mm(mat.t(), basis)))[0]
    left, _, _ = torch.linalg.svd(torch.sparse.mm(mat.t(), basis).t(), full_matrices=False)
    return (basis @ left)[:, 1:rank + 1]  # the first vector only measures degree


def _kd_labels(points: torch.Tensor, k: int) -> torch.Tensor:
    """Equal-count labels from a k-d ordering of ``points [n, r]``: repeated median splits, one
    coordinate per level, then ``k`` contiguous runs of the ordering."""
    n, r = points.shape
    order = torch.arange(n, device=points.device)
    if r == 0:  # no spectrum (a rank-1 graph): any balanced start will do
        return order * k // n
    for level in range(max(1, math.ceil(math.log2(k)))):
        group = torch.arange(n, device=points.device) * (1 << level) // n  # of each position in ``order``
        by_value = torch.argsort(points[order, level % r], stable=True)
        order = order[by_value[torch.argsort(group[by_value], stable=True)]]
    labels = torch.empty_like(order)
    labels[order] = torch.arange(n, device=points.device) * k // n
    return labels


def _reporter(progress):
    if progress is True:
        return lambda info: print(" ".join(f"{key}={val}" for key, val in info.items()), file=sys.stderr, flush=True)
    if progress is None or progress is False or callable(progress):
        return progress or None
    raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")


def _propagate(users: _Side, items: _Side, user_labels, item_labels, k, *, resolution, slack, sweeps, fraction,
               generator, report, stage, user_slack=None, min_room: float = 0.0, tolerance: float = 0.0):
    """Alternating balanced sweeps (users, then items) until fewer than ``tolerance`` of the items
    move in a sweep (no node at all with ``tolerance = 0``) or ``sweeps`` run out; returns the
    sweeps run. ``user_slack`` (default ``slack``) bounds the user side."""
    total = _total(users.wt)
    for t in range(sweeps):
        start = time.perf_counter()
        moved = []
        for side, own, other, bound in ((users, user_labels, item_labels, slack if user_slack is None else user_slack),
                                        (items, item_labels, user_labels, slack)):
            gamma = resolution * total / _total(side.weight) ** 2  # alpha = 1: modularity's null model
            moved.append(_sweep(side, own, other, k, gamma, bound, fraction, generator, min_room))
        if report is not None:
            report({"stage": stage, "sweep": t + 1, "users_moved": moved[0], "items_moved": moved[1],
                    "seconds": round(time.perf_counter() - start, 3)})
        if sum(moved) == 0 or moved[1] < tolerance * items.num_nodes:
            return t + 1
    return sweeps


def _check_options(alpha, resolution, slack, sweeps, move_fraction):
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(resolution, (int, float)) and resolution >= 0.0 and math.isfinite(resolution)):
        raise ValueError(f"resolution must be a finite number >= 0, got {resolution!r}")
    if not (isinstance(slack, (int, float)) and 0.0 <= slack <= 1.0):
        raise ValueError(f"slack must be a number in [0, 1], got {slack!r}")
    _check_count("sweeps", sweeps, 0)
    if not (isinstance(move_fraction, (int, float)) and 0.0 < move_fraction <= 1.0):
        raise ValueError(f"move_fraction must be a number in (0, 1], got {move_fraction!r}")


def co_cluster(interactions, num_clusters: int, *, num_secondary: int = 0, num_users: int | None = None,
               num_items: int | None = None, alpha: float = 0.5, resolution: float = 1.0, slack: float = 0.1,
               sweeps: int = 20, move_fraction: float = 0.5, spectral_rank: int = 16, seed: int = 0, device=None,
               progress: bool | Callable[[dict], None] | None = None) -> CoClusters:
    """Balanced co-clusters of users and items (BACO), for sharing embedding rows.

    ``interactions``: ``(user_ids, item_ids)`` 1-D integer tensors/arrays, or a scipy / torch
    sparse user x item matrix (values are edge weights). Runs on the device of the given tensors
    (or ``device``). Returns ``CoClusters``: ``user_clusters [num_users]`` and ``item_clusters
    [num_items]`` in ``[0, num_clusters)`` (labels are shared: users and items with one label form a
    co-cluster), and with ``num_secondary > 0`` ``secondary_user_clusters`` in ``[0, num_secondary)``.

    ``alpha``: node weight ``deg ** alpha`` that clusters balance (0: equal counts, 1: equal edge
    volume, so popular nodes get rows of their own); ``resolution``: strength of the balance
    penalty in the objective; ``slack``: hard bound on each cluster's weight relative to the mean;
    ``move_fraction``: share of nodes allowed to move per sweep; ``spectral_rank``: dimensions of
    the spectral embedding that seeds item labels. Deterministic for a seed on a
    given device. ``progress=True`` prints one line per sweep to stderr; a callable gets a dict.
    """
    k = _check_count("num_clusters", num_clusters, 1)
    k2 = _check_count("num_secondary", num_secondary, 0)
    _check_count("spectral_rank", spectral_rank, 1)
    _check_options(alpha, resolution, slack, sweeps, move_fraction)
    report = _reporter(progress)
    users, items, weights, nu, ni = _edges(interactions, num_users, num_items, device)
    dev = users.device
    gen = torch.Generator().manual_seed(seed)
    user_side, item_side = _sides(users, items, weights, nu, ni, alpha)
    opts = dict(resolution=resolution, slack=slack, sweeps=sweeps, fraction=move_fraction, generator=gen,
                report=report)
    # items start from balanced spectral cells (random starts get stuck in merged/split clusters);
    # the first user step then gives users their items' labels
    user_labels = _balanced_labels(nu, k, gen, dev)
    item_labels = _kd_labels(_item_spectrum(item_side, nu, spectral_rank, gen), k)
    _propagate(user_side, item_side, user_labels, item_labels, k, stage="primary", **opts)
    secondary = None
    if k2:
        residual = user_labels[users] != item_labels[items]  # what the primary clusters leave unexplained
        if not bool(residual.any()):
            residual = torch.ones_like(residual)
        rest_users, rest_items = _sides(users[residual], items[residual], weights[residual], nu, ni, alpha)
        secondary = _balanced_labels(nu, k2, gen, dev)
        _propagate(rest_users, rest_items, secondary, _balanced_labels(ni, k2, gen, dev), k2, stage="secondary",
                   **opts)
    return CoClusters(user_labels, item_labels, secondary, k, k2)


class LevelCodes(NamedTuple):
    """Multi-level co-cluster ids (int64): column ``j`` holds level ``j``'s labels in ``[0, num_rows[j])``."""

    user_codes: torch.Tensor
    item_codes: torch.Tensor
    num_rows: tuple[int, ...]


def level_codes(interactions, num_rows, *, num_users: int | None = None, num_items: int | None = None,
                device=None, seed: int = 0, progress: bool | Callable[[dict], None] | None = None,
                **options) -> LevelCodes:
    """Compositional BACO ids: level ``j`` co-clusters the edges no earlier level explains.

    One co-cluster label per entity ties every entity of a cluster in score; the sum of one row per
    level (``recjpq.nn.ClusterEmbedding(codes, dim, num_rows)``) gives entities (near-)unique row
    combinations at the same row budget. Level 0 is ``co_cluster`` on the whole graph; level ``j``
    runs it on the residual graph (edges whose user and item got different labels on every earlier
    level, as BACO's secondary user clusters do), so each level describes what the earlier ones
    miss. Users and items share each level's labels (co-clusters). ``num_rows``: clusters per level;
    ``options`` go to ``co_cluster`` (``alpha``, ``sweeps``, ...); level ``j`` uses ``seed + j``.
    """
    if not (isinstance(num_rows, (list, tuple)) and num_rows):
        raise ValueError(f"num_rows must be a non-empty list of cluster counts, got {num_rows!r}")
    sizes = [_check_count(f"num_rows[{j}]", k, 1) for j, k in enumerate(num_rows)]
    users, items, weights, nu, ni = _edges(interactions, num_users, num_items, device)
    unexplained = torch.ones_like(users, dtype=torch.bool)
    user_codes, item_codes = [], []
    for j, k in enumerate(sizes):
        keep = unexplained if bool(unexplained.any()) else torch.ones_like(unexplained)
        graph = torch.sparse_coo_tensor(torch.stack([users[keep], items[keep]]), weights[keep], (nu, ni),
                                        check_invariants=False)
        level = co_cluster(graph, k, seed=seed + j, progress=progress, **options)
        unexplained &= level.user_clusters[users] != level.item_clusters[items]
        user_codes.append(level.user_clusters)
        item_codes.append(level.item_clusters)
    return LevelCodes(torch.stack(user_codes, 1), torch.stack(item_codes, 1), tuple(sizes))


_GRID = 2.0 ** -20  # two-hop weights are multiples of this: their sums are exact, so order-free


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    return x.div(_GRID).round().mul(_GRID)


class _TwoHop:
    """Item-to-code affinities through users, ``S = B^T D_U^-1 B Y`` without an item's own term:
    ``S[i, c]`` is the weight of item i's co-occurrences with the items of code c, each user's
    co-occurrences weighted ``1 / deg(u)``. Weights lie on a dyadic grid so that every sum is
    exact, whatever the thread count or summation order.

    This is the pure-torch reference: a dense ``users x K`` code histogram per sweep, times the
    scored items' CSR rows. ``_NativeTwoHop`` computes the same from the users' edge lists."""

    def __init__(self, users: _Side, items: _Side):
        self.users, self.items = users, items
        dev = users.src.device
        degree = torch.zeros(users.num_nodes, dtype=torch.float64, device=dev).index_add_(0, users.src,
                                                                                         users.wt.double())
        self.user_value = _on_grid(users.wt.double() / degree[users.src]).clamp_min(_GRID)  # i's weight in u's histogram
        item_value = self.user_value[items.from_users]  # same, in item order
        self.self_weight = torch.zeros(items.num_nodes, dtype=torch.float64, device=dev).index_add_(
            0, items.src, _on_grid(items.wt.double() * item_value))
        per_user = torch.zeros(users.num_nodes, dtype=torch.float64, device=dev).index_add_(0, users.src,
                                                                                           self.user_value)
        # row sums of S (code-independent): each item's co-occurrence strength, the null model's degrees
        self.strength = torch.zeros_like(self.self_weight).index_add_(
            0, items.src, _on_grid(items.wt.double() * per_user[items.dst])) - self.self_weight
        self.total = _total(self.strength)

    def state(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """What one sweep reads for ``codes``: ``[users, k]``, each user's items' weights per code."""
        hist = torch.zeros(self.users.num_nodes * k, dtype=torch.float64, device=codes.device)
        return hist.index_add_(0, self.users.src * k + codes[self.users.dst], self.user_value).view(-1, k)

    def _rows(self, hist: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``S[idx]`` (``idx`` sorted), dense ``[len(idx), k]`` float64."""
        items = self.items
        begin = items.indptr[idx]
        degree = items.indptr[idx + 1] - begin
        crow = torch.cat([degree.new_zeros(1), degree.cumsum(0)])
        pos = torch.arange(int(crow[-1]), device=idx.device) + (begin - crow[:-1]).repeat_interleave(degree)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all we use
            warnings.simplefilter("ignore", UserWarning)
            mat = torch.sparse_csr_tensor(crow, items.dst[pos], items.wt[pos].double(),
                                          (idx.numel(), self.users.num_nodes), check_invariants=False)
        out = torch.sparse.mm(mat, hist)
        out[torch.arange(idx.numel(), device=idx.device), codes[idx]] -= self.self_weight[idx]
        return out

    def best(self, hist: torch.Tensor, codes: torch.Tensor, idx: torch.Tensor, volume: torch.Tensor, gamma: float):
        """For the items ``idx`` (sorted): the code maximising ``S[i, c] - gamma s_i (V_c - s_i [c ==
        own])`` (first maximum: ties go to the lower code) and its gain over the item's own code."""
        k = volume.numel()
        rows = max(1, _DENSE_BUDGET // k)
        best = torch.empty_like(idx)
        gain = torch.empty(idx.numel(), dtype=torch.float64, device=idx.device)
        for start in range(0, idx.numel(), rows):
            part = idx[start:start + rows]
            score, mine = self._rows(hist, codes, part), codes[part, None]
            own = gamma * self.strength[part, None]
            score -= own * volume[None, :]
            score.scatter_add_(1, mine, own * self.strength[part, None])  # an item does not compete with itself
            pick = score.argmax(1, keepdim=True)
            best[start:start + rows] = pick.squeeze(1)
            gain[start:start + rows] = (score.gather(1, pick) - score.gather(1, mine)).squeeze(1)
        return best, gain

    def inside(self, hist: torch.Tensor, codes: torch.Tensor, k: int) -> float:
        """``sum_i S[i, codes[i]]``: co-occurrence weight inside codes (exact: grid values)."""
        users = self.users
        return _total(users.wt.double() * hist[users.src, codes[users.dst]]) - _total(self.self_weight)


class _NativeTwoHop(_TwoHop):
    """``_TwoHop`` with the C++ kernels of ``csrc/cpu/baco_two_hop.cpp``: each scored item sums its
    users' edge lists (item codes, one byte each for K <= 256) into one K-wide row, so a sweep costs
    two-hop paths instead of K per edge and reads no dense histogram, except for users with more
    than ``K / 2`` edges: their dense histogram rows (at most ``_DENSE_BUDGET / 2`` elements, the
    heaviest users first) cost K vectorised multiply-adds instead. That halves the scoring time on
    ML-1M (165 items per user); a K / 4 threshold was slower on a log of 50 items per user. With
    integer edge weights every sum is exact, so the codes equal the reference's."""

    def __init__(self, users: _Side, items: _Side, k: int):
        super().__init__(users, items)
        dev = users.src.device
        self.user_weight = users.wt.double()
        self.item_weight = items.wt.double()
        # the weight all of a user's edges share (every user of an unweighted log), else -1
        lowest = torch.full((users.num_nodes,), math.inf, dtype=torch.float64, device=dev)
        lowest.scatter_reduce_(0, users.src, self.user_value, "amin")
        highest = torch.zeros_like(lowest).scatter_reduce_(0, users.src, self.user_value, "amax")
        self.uniform_value = torch.where(lowest == highest, lowest, -1.0)
        # per item edge (i, u): u's edge list and shared weight, so that a row reads only u's codes at random
        self.user_begin, self.user_end = users.indptr[items.dst], users.indptr[items.dst + 1]
        self.user_shared = self.uniform_value[items.dst]
        degree = users.indptr[1:] - users.indptr[:-1]
        by_degree = torch.argsort(degree, descending=True, stable=True)[:_DENSE_BUDGET // (2 * k)]
        heavy = by_degree[degree[by_degree] > k // 2]
        slot = torch.full((users.num_nodes,), -1, dtype=torch.int64, device=dev)
        slot[heavy] = torch.arange(heavy.numel(), device=dev)
        self.dense_slot = slot[items.dst].int()
        edges = (slot[users.src] >= 0).nonzero().squeeze(1)  # the heavy users' edges, user order
        self.dense_key, self.dense_items = slot[users.src[edges]] * k, users.dst[edges]
        self.dense_values, self.num_dense = self.user_value[edges], heavy.numel()

    def state(self, codes: torch.Tensor, k: int):
        """The code of each user edge's item (user CSR order), and the heavy users' code histograms."""
        edge_codes = torch.index_select(codes.to(torch.uint8 if k <= 256 else torch.int32), 0, self.users.dst)
        dense = torch.zeros(self.num_dense * k, dtype=torch.float64, device=codes.device)
        dense.index_add_(0, self.dense_key + codes[self.dense_items], self.dense_values)
        return edge_codes, dense.view(self.num_dense, k)

    def best(self, state, codes, idx, volume, gamma):
        users, items = self.users, self.items
        edge_codes, dense = state
        return torch.ops.recjpq_cpu.baco_best_codes(items.indptr, self.item_weight, self.user_begin, self.user_end,
                                                    self.user_shared, self.dense_slot, dense, users.indptr,
                                                    self.uniform_value, edge_codes, self.user_value, idx, codes,
                                                    self.self_weight, self.strength, volume, gamma)

    def inside(self, state, codes, k):
        per_user = torch.ops.recjpq_cpu.baco_inside(self.users.indptr, self.uniform_value, state[0], self.user_value,
                                                    self.user_weight, k)
        return _total(per_user) - _total(self.self_weight)


def _native_two_hop(device) -> bool:
    """Whether the refinement can use the C++ kernels: ``recjpq._C`` built with them (an older build
    lacks them), tensors on the CPU."""
    from recjpq.backends.cpu import unavailable_reason

    return unavailable_reason(torch.device(device)) is None and hasattr(torch.ops.recjpq_cpu, "baco_best_codes")


def _refine_split(two_hop: _TwoHop, codes, k: int, *, resolution, slack, min_room, sweeps, tolerance, fraction,
                  generator, report, stage):
    """Balanced label propagation of one split's item codes on the two-hop item graph, in place.

    Objective: the modularity of the codes on the item co-occurrence graph, ``Q = intra -
    resolution * sum_c (V_c / V)^2``, where ``intra`` is the share of co-occurrence weight inside
    codes and ``V_c`` the co-occurrence strength of code c's items (the null model, so popular items
    do not attract everyone). Item i moves to ``argmax_c S[i, c] - resolution s_i (V_c - s_i [c ==
    own]) / V`` (its gain in Q) when the capacity bounds allow: ``N / K`` items per code, give or
    take ``max(slack N / K, min_room)``. Returns the sweeps run and the objective before and after
    (``intra``, ``modularity`` and ``balance`` = ``K sum_c n_c^2 / N^2``, 1 when all codes hold
    equally many items)."""
    n = two_hop.items.num_nodes
    total = two_hop.total if two_hop.total > 0 else 1.0
    gamma = resolution / total
    mean = n / k
    room = max(slack * mean, min(min_room, mean))
    hi, lo = max(mean + room, 1.0), max(mean - room, min(1.0, math.floor(mean)))  # never an empty code if N >= K
    before, ran, done = None, 0, False
    while True:
        start_time = time.perf_counter()
        state = two_hop.state(codes, k)
        volume = torch.zeros(k, dtype=torch.float64, device=codes.device).index_add_(0, codes, two_hop.strength)
        counts = torch.bincount(codes, minlength=k).double()
        intra = two_hop.inside(state, codes, k) / total
        objective = {"intra": round(intra, 6),
                     "modularity": round(intra - resolution * _total(volume.square()) / total ** 2, 6),
                     "balance": round(k * _total(counts.square()) / (n * n), 6)}
        before = before or objective
        if done or ran == sweeps:
            return ran, before, objective
        # only the items drawn to move this sweep are scored
        drawn = (torch.rand(n, generator=generator).to(codes.device) < fraction).nonzero().squeeze(1)
        best, gain = two_hop.best(state, codes, drawn, volume, gamma)
        improving = (best != codes[drawn]) & (gain > 1e-12 * total)
        movers, best, gain = drawn[improving], best[improving], gain[improving]
        ok = _accept(codes[movers], best, gain, torch.ones_like(gain), counts, lo, hi, k)
        codes[movers[ok]] = best[ok]
        moved, ran = int(ok.sum()), ran + 1
        if report is not None:
            report({"stage": stage, "sweep": ran, "items_moved": moved, "improving": int(movers.numel()),
                    **objective, "seconds": round(time.perf_counter() - start_time, 3)})
        done = moved == 0 or moved < tolerance * n


def item_codes(interactions, num_items: int, num_splits: int, num_codes: int = 256, *, seed: int = 0,
               sweeps: int = 10, refined_splits: int | None = None, slack: float = 0.05, min_room: float = 2.0,
               tolerance: float = 1e-3, resolution: float = 1.0, move_fraction: float = 0.5, device=None,
               progress: bool | Callable[[dict], None] | None = None) -> torch.Tensor:
    """BACO item codes ``[num_items, num_splits]`` (int64) for RecJPQ.

    Split m starts from spectral component m of the degree-normalised interaction graph cut into
    ``num_codes`` equal-count bins (different components keep the splits diverse); balanced
    co-clustering sweeps then move items so that a code becomes a group of items that co-occur in
    users' histories (``_refine_split``: users carry their whole code histogram between items, each
    user's co-occurrences weighted ``1 / deg(u)``). A code holds ``N / K`` items give or take
    ``max(slack * N / K, min_room)``, so that codes of a dozen items can still trade items. Sweeps
    stop when fewer than ``tolerance`` of the items move, or after ``sweeps``. Only the first
    ``refined_splits`` splits (default: half, rounded up) are refined; the rest keep their spectral
    codes, which keeps code tuples near-unique. ``interactions`` as in ``co_cluster``.
    ``progress`` gets one dict per sweep (``items_moved`` and the objective before the moves) and
    one per refined split: the objective before and after, and the share of items whose code the
    refinement changed. The codes are the same for any thread count (exact sums, one-thread
    spectrum).
    """
    m_total = _check_count("num_splits", num_splits, 1)
    k = _check_count("num_codes", num_codes, 2)
    refined = (m_total + 1) // 2 if refined_splits is None else min(_check_count("refined_splits", refined_splits, 0),
                                                                    m_total)
    _check_options(0.0, resolution, slack, sweeps, move_fraction)
    if not (isinstance(min_room, (int, float)) and 0.0 <= min_room < math.inf):
        raise ValueError(f"min_room must be a finite number >= 0, got {min_room!r}")
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance <= 1.0):
        raise ValueError(f"tolerance must be a number in [0, 1], got {tolerance!r}")
    report = _reporter(progress)
    users, items, weights, nu, ni = _edges(interactions, None, _check_count("num_items", num_items, 1), device)
    user_side, item_side = _sides(users, items, weights, nu, ni, 0.0)
    gen = torch.Generator().manual_seed(seed)
    spectrum = _item_spectrum(item_side, nu, m_total, gen)
    # random ties between items of equal value (e.g. no interactions), random codes beyond the graph's rank
    noise = torch.randn(ni, m_total, generator=gen).to(users.device)
    scale = spectrum.abs().amax(0).clamp_min(1e-30) * 1e-6
    spectrum = torch.cat([spectrum + noise[:, :spectrum.shape[1]] * scale, noise[:, spectrum.shape[1]:]], 1)
    codes = torch.empty(ni, m_total, dtype=torch.int64, device=users.device)
    two_hop = None
    if refined:
        native = _native_two_hop(users.device)
        two_hop = _NativeTwoHop(user_side, item_side, k) if native else _TwoHop(user_side, item_side)
    for m in range(m_total):
        order = torch.argsort(spectrum[:, m], stable=True)
        codes[order, m] = torch.arange(ni, device=users.device) * k // ni
        if m < refined:
            start = codes[:, m].clone()
            column = start.clone()  # contiguous, for the C++ kernels
            ran, before, after = _refine_split(two_hop, column, k, resolution=resolution, slack=slack,
                                               min_room=min_room, sweeps=sweeps, tolerance=tolerance,
                                               fraction=move_fraction, generator=gen, report=report,
                                               stage=f"split {m}")
            codes[:, m] = column
            if report is not None:
                counts = torch.bincount(codes[:, m], minlength=k)
                report({"stage": f"split {m}", "sweeps": ran,
                        "items_changed": round(float((codes[:, m] != start).double().mean()), 6),
                        "codes_min": int(counts.min()), "codes_max": int(counts.max()),
                        **{f"{key}_before": v for key, v in before.items()},
                        **{f"{key}_after": v for key, v in after.items()}})
    return codes
