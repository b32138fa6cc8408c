"""What users would run instead of recjpq, each from the same catalogue, timed by the benchmarks.

- dense: the decoded ``[N, d]`` item matrix, ``q @ W.T`` and ``torch.topk``;
- split loop: RecJPQ's original scoring in plain PyTorch (``scores += S[:, m, codes[:, m]]``);
- FAISS ``IndexPQ`` (inner product, exhaustive ADC) holding the very same codes and centroids.
"""
from __future__ import annotations

import os
import platform

import torch

import recjpq
from recjpq import ops


class Catalogue:
    """A random PQ catalogue and a batch of queries."""

    def __init__(self, n: int, m: int, d: int, batch: int, num_codes: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.codes = torch.randint(0, num_codes, (n, m), generator=g).to(recjpq.codes.codes_dtype(num_codes))
        self.centroids = torch.randn(m, num_codes, d // m, generator=g)
        self.queries = torch.randn(batch, d, generator=g)
        self.num_codes = num_codes
        self._codes_long = None

    @property
    def codes_long(self) -> list[torch.Tensor]:
        """Per-split int64 code columns, prepared once (as a torch user would keep them)."""
        if self._codes_long is None:
            self._codes_long = [c.long().contiguous() for c in self.codes.T]
        return self._codes_long

    def item_matrix(self, dtype=torch.float32) -> torch.Tensor:
        m = self.codes.shape[1]
        return self.centroids[torch.arange(m), self.codes.long()].flatten(1).to(dtype).contiguous()


def dense_topk(queries: torch.Tensor, items: torch.Tensor, k: int):
    scores = queries.to(items.dtype) @ items.T
    return torch.topk(scores.float(), k, dim=1)


def split_loop_topk(cat: Catalogue, queries: torch.Tensor, k: int):
    S = ops.subitem_scores(queries, cat.centroids)
    scores = S[:, 0, cat.codes_long[0]]
    for m in range(1, S.shape[1]):
        scores += S[:, m, cat.codes_long[m]]
    return torch.topk(scores, k, dim=1)


def recjpq_topk(cat: Catalogue, queries: torch.Tensor, k: int, backend: str | None = None):
    S = ops.subitem_scores(queries, cat.centroids)
    return ops.pq_topk(S, cat.codes, k, backend=backend)


def faiss_index_pq(cat: Catalogue):
    """A FAISS ``IndexPQ`` over the same codes and centroids (needs K = 256 and faiss installed)."""
    from recjpq.interop import to_faiss

    return to_faiss((cat.codes, cat.centroids))


def faiss_topk(index, queries: torch.Tensor, k: int):
    distances, labels = index.search(queries.numpy(), k)
    return torch.from_numpy(distances), torch.from_numpy(labels)


def machine() -> dict:
    """What ran the benchmark, for the results JSON."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
