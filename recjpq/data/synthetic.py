"""Synthetic sequential data shaped like real logs, for the demo and tests at any catalogue size.

Items have a global log-normal popularity, fall into clusters (genres), each with its own order
(think release order), and have their own latent vector. Each user has a taste vector, prefers a
few clusters and moves through one at a time: with probability ``markov`` a step looks at the
current item's successors in the cluster's order (short hops ahead), else at popular items of the
current cluster, and with probability ``jump`` the user first switches to another preferred
cluster. Of those candidates it takes the one whose vector best matches the user's taste, drifted
towards the previous item's vector (a Gumbel-max draw). Histories have a log-normal length and,
as in ML-1M, no item twice (``repeats=False``). The defaults were fitted to ML-1M's statistics
(``sequence_statistics``; the comparison is in docs/models.md): a sequential model can learn the
successors, the clusters and, with a table of its own per item, the item vectors; a popularity
model only the head. Items of one cluster differ by their vectors, which shared sub-items
(RecJPQ) keep only in part: the dense-RecJPQ gap comes from there, as on real data.
"""
from __future__ import annotations

import numpy as np

from recjpq.data.loaders import SequenceData

_RESAMPLES = 4  # tries per fallback to replace an already-seen item (repeats=False)


def _lengths(rng: np.random.Generator, num_users: int, mean_length: int, min_length: int) -> np.ndarray:
    """Log-normal lengths (sigma 1, as ML-1M's) shifted to ``min_length``, mean ``mean_length``."""
    excess = max(mean_length - min_length, 1)
    raw = rng.lognormal(np.log(excess) - 0.5, 1.0, num_users)
    return min_length + np.minimum(np.rint(raw), 20 * excess).astype(np.int64)


def item_vectors(num_items: int, latent_dim: int = 64, seed: int = 0) -> np.ndarray:
    """The generator's latent item vectors, row ``i - 1`` for item ``i`` (standard normal, float32)."""
    return np.random.default_rng([seed, 1]).standard_normal((num_items, latent_dim), dtype=np.float32)


def generate_sequences(num_users: int = 5000, num_items: int = 10000, *, num_clusters: int = 20,
                       mean_length: int = 40, min_length: int = 5, clusters_per_user: int = 3,
                       markov: float = 0.3, jump: float = 0.1, popularity: float = 2.4, hop: float = 0.3,
                       latent_dim: int = 64, taste: float = 14.0, drift: float = 1.0, candidates: int = 32,
                       repeats: bool = False, seed: int = 0) -> SequenceData:
    """``num_users`` sequences over items ``1..num_items`` (vectorised over users per step).

    ``popularity``: sigma of the items' log-normal popularity weights (0: uniform);
    ``hop``: success probability of the geometric hop from an item to its successor (1: always
    the next item in the cluster's order; smaller: a wider spread);
    ``latent_dim``, ``taste``, ``drift``, ``candidates``: items (``item_vectors``) and users have
    standard-normal vectors in ``latent_dim`` dimensions; a step draws ``candidates`` items and
    keeps the largest ``taste * z + Gumbel noise``, where z is (user + drift * previous item) .
    candidate, scaled to unit variance (taste 0: the first candidate, vectors play no part).
    """
    for name, value in (("num_users", num_users), ("num_items", num_items), ("num_clusters", num_clusters),
                        ("mean_length", mean_length), ("min_length", min_length),
                        ("clusters_per_user", clusters_per_user), ("latent_dim", latent_dim),
                        ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_clusters > num_items:
        raise ValueError(f"num_clusters={num_clusters} exceeds num_items={num_items}")
    for name, value in (("markov", markov), ("jump", jump)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if not 0 < hop <= 1:
        raise ValueError(f"hop must lie in (0, 1], got {hop}")
    for name, value in (("popularity", popularity), ("taste", taste), ("drift", drift)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng(seed)
    # position p (cluster order: cluster c holds positions start[c]..start[c]+size[c]-1) -> item id
    bounds = np.linspace(0, num_items, num_clusters + 1).astype(np.int64)
    start, size = bounds[:-1], np.diff(bounds)
    item_of = rng.permutation(num_items) + 1
    weight = rng.lognormal(0.0, popularity, num_items)  # independent of the cluster order
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    vectors = item_vectors(num_items, latent_dim, seed)[item_of - 1]  # by position
    scale = np.float32(taste / (np.sqrt(latent_dim) * np.sqrt(1 + drift ** 2)))

    def popular(clusters):
        lo, hi = cum[start[clusters]], cum[start[clusters] + size[clusters]]
        pos = np.searchsorted(cum, lo + (hi - lo) * rng.random(len(clusters)), side="right") - 1
        return np.clip(pos, start[clusters], start[clusters] + size[clusters] - 1)

    def anywhere(n):
        return np.minimum(np.searchsorted(cum, cum[-1] * rng.random(n), side="right") - 1, num_items - 1)

    def choose(users, own, prev, follows):
        """One of ``candidates`` items, drawn (Gumbel-max) by its match with the user's taste drifted
        towards the previous item."""
        n = len(users)
        ahead = (prev - start[own])[:, None] + rng.geometric(hop, (n, candidates))
        succ = start[own][:, None] + ahead % size[own][:, None]
        cand = np.where(follows[:, None], succ, popular(np.repeat(own, candidates)).reshape(n, candidates))
        if taste == 0:
            return cand[:, 0]
        now = tastes[users] + np.float32(drift) * vectors[prev]
        gumbel = -np.log(-np.log(rng.random((n, candidates), dtype=np.float32) + np.float32(1e-20)))
        score = scale * np.matmul(vectors[cand], now[:, :, None])[..., 0] + gumbel
        return cand[np.arange(n), score.argmax(axis=1)]

    lengths = _lengths(rng, num_users, mean_length, min_length)
    order = np.argsort(-lengths, kind="stable")  # longest first: the users still active at step t are a prefix
    active_at = np.searchsorted(-lengths[order], -np.arange(int(lengths.max())), side="right")
    prefs = rng.integers(0, num_clusters, (num_users, clusters_per_user))[order]
    tastes = rng.standard_normal((num_users, latent_dim), dtype=np.float32)
    cluster = prefs[:, 0].copy()
    grid = np.zeros((num_users, int(lengths.max())), dtype=np.int64)
    grid[:, 0] = popular(cluster)
    for t in range(1, grid.shape[1]):
        n = active_at[t]
        users = np.arange(n)
        prev = grid[:n, t - 1]
        switch = rng.random(n) < jump
        cluster[:n] = np.where(switch, prefs[users, rng.integers(0, clusters_per_user, n)], cluster[:n])
        own = cluster[:n]
        follows = (rng.random(n) < markov) & ~switch  # prev lies in its cluster unless the user switched
        pos = choose(users, own, prev, follows)
        if not repeats:  # redraw seen items: in the cluster, then (a cluster used up) anywhere
            for attempt in range(3 * _RESAMPLES):
                seen = np.flatnonzero((grid[:n, :t] == pos[:, None]).any(axis=1))
                if not len(seen):
                    break
                pos[seen] = (choose(seen, own[seen], prev[seen], np.zeros(len(seen), bool))
                             if attempt < _RESAMPLES else anywhere(len(seen))
                             if attempt < 2 * _RESAMPLES else rng.integers(0, num_items, len(seen)))
        grid[:n, t] = pos
    sequences = [None] * num_users
    for row, user in enumerate(order):
        sequences[user] = item_of[grid[row, :lengths[user]]]
    return SequenceData(sequences, [str(i) for i in range(1, num_items + 1)],
                        [str(u) for u in range(1, num_users + 1)])


def sequence_statistics(sequences, num_items: int, k: int = 10) -> dict:
    """What a sequential model sees in a log, to compare a generator with real data.

    Lengths; popularity (share of interactions on the top 1% and 10% of items, Gini); the share
    of steps that repeat an item already in the history; and two baselines' hit rate at ``k`` on
    the transitions of odd-numbered users, with counts from the even-numbered ones: the k most
    frequent successors of the previous item (``successor_hit@k``) and the k most popular items
    (``popularity_hit@k``).
    """
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    lengths = np.array([len(s) for s in seqs])
    counts = np.sort(np.bincount(np.concatenate(seqs), minlength=num_items + 1)[1:])
    total = counts.sum()
    gini = float((2 * np.arange(1, num_items + 1) - num_items - 1) @ counts / (num_items * total))
    transitions = int((lengths - 1).clip(0).sum())
    repeated = sum(len(s) - len(np.unique(s)) for s in seqs)

    def pairs(group):
        return (np.concatenate([s[:-1] for s in group] or [np.zeros(0, np.int64)]),
                np.concatenate([s[1:] for s in group] or [np.zeros(0, np.int64)]))

    (fit_prev, fit_next), (test_prev, test_next) = pairs(seqs[0::2]), pairs(seqs[1::2])
    width = num_items + 1
    keys, freq = np.unique(fit_prev * width + fit_next, return_counts=True)
    prev_of = keys // width
    ranked = np.lexsort((-freq, prev_of))  # by previous item, most frequent successor first
    rank = np.arange(len(ranked)) - np.searchsorted(prev_of[ranked], prev_of[ranked], side="left")
    top_successors = keys[ranked][rank < k]
    popular = np.argsort(-np.bincount(np.concatenate(seqs[0::2]), minlength=width)[1:], kind="stable")[:k] + 1
    return {"users": len(seqs), "items": num_items, "interactions": int(total),
            "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_mean": round(float(lengths.mean()), 1), "length_p90": float(np.percentile(lengths, 90)),
            "length_max": int(lengths.max()),
            "top1%_share": round(float(counts[::-1][:max(1, num_items // 100)].sum() / total), 3),
            "top10%_share": round(float(counts[::-1][:max(1, num_items // 10)].sum() / total), 3),
            "gini": round(gini, 3), "repeat_share": round(repeated / max(transitions, 1), 3),
            f"successor_hit@{k}": round(float(np.isin(test_prev * width + test_next, top_successors).mean()), 3),
            f"popularity_hit@{k}": round(float(np.isin(test_next, popular).mean()), 3)}
