"""Synthetic sequential data with real structure, for demos and tests at any catalogue size.

Items fall into clusters (contiguous ranges, then shuffled ids); inside a cluster popularity
follows a power law. Each user prefers a few clusters. A step either follows the Markov chain
(the current item's successor, a short hop ahead in its cluster's order), picks a popular item
of the same cluster, or jumps to another preferred cluster. A sequential model can learn the
chain, a popularity model only the head: the gap is what the demo shows.
"""
from __future__ import annotations

import numpy as np

from recjpq.data.loaders import SequenceData


def generate_sequences(num_users: int = 5000, num_items: int = 10000, *, num_clusters: int = 50,
                       mean_length: int = 40, min_length: int = 5, clusters_per_user: int = 3,
                       markov: float = 0.6, stay: float = 0.3, zipf: float = 2.0,
                       seed: int = 0) -> SequenceData:
    """``num_users`` sequences over items ``1..num_items`` (vectorised over users per step)."""
    for name, value in (("num_users", num_users), ("num_items", num_items), ("num_clusters", num_clusters),
                        ("mean_length", mean_length), ("min_length", min_length),
                        ("clusters_per_user", clusters_per_user)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_clusters > num_items:
        raise ValueError(f"num_clusters={num_clusters} exceeds num_items={num_items}")
    if not (0 <= markov and 0 <= stay and markov + stay <= 1):
        raise ValueError(f"need 0 <= markov, 0 <= stay, markov + stay <= 1; got {markov}, {stay}")
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_items, num_clusters + 1).astype(np.int64)
    start, size = bounds[:-1], np.diff(bounds)
    shuffled_id = rng.permutation(num_items) + 1  # position in cluster order -> item id

    def popular(clusters):
        rank = np.floor(size[clusters] * rng.random(len(clusters)) ** zipf).astype(np.int64)
        return start[clusters] + rank

    lengths = np.maximum(min_length, rng.geometric(1.0 / mean_length, num_users))
    prefs = rng.integers(0, num_clusters, (num_users, clusters_per_user))
    cluster = prefs[:, 0].copy()
    pos = popular(cluster)
    steps = [pos]
    for _ in range(1, int(lengths.max())):
        u = rng.random(num_users)
        hop = pos - start[cluster] + 1 + rng.geometric(0.7, num_users) - 1
        successor = start[cluster] + hop % size[cluster]
        jump = u >= markov + stay
        cluster = np.where(jump, prefs[np.arange(num_users), rng.integers(0, clusters_per_user, num_users)],
                           cluster)
        pos = np.where(u < markov, successor, popular(cluster))
        steps.append(pos)
    grid = shuffled_id[np.stack(steps, axis=1)]
    sequences = [grid[row, :lengths[row]] for row in range(num_users)]
    return SequenceData(sequences, [str(i) for i in range(1, num_items + 1)],
                        [str(u) for u in range(1, num_users + 1)])
