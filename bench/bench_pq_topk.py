"""pytest-benchmark: pq_topk on every available CPU backend against the peers, same catalogue.

Shape from the environment (defaults keep a run short): RECJPQ_BENCH_N, _M, _D, _K.
    python -m pytest bench/bench_pq_topk.py --benchmark-only
"""
import os

import pytest

import recjpq
from bench.peers import Catalogue, dense_topk, faiss_index_pq, faiss_topk, recjpq_topk, split_loop_topk

N = int(os.environ.get("RECJPQ_BENCH_N", 200_000))
M = int(os.environ.get("RECJPQ_BENCH_M", 8))
D = int(os.environ.get("RECJPQ_BENCH_D", 512))
K = int(os.environ.get("RECJPQ_BENCH_K", 10))
BATCHES = (1, 64)


@pytest.fixture(scope="module")
def catalogue():
    return Catalogue(N, M, D, max(BATCHES))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", recjpq.available_backends("cpu"))
def bench_recjpq(benchmark, catalogue, backend, batch):
    q = catalogue.queries[:batch].contiguous()
    benchmark.group = f"pq_topk B={batch}"
    benchmark(recjpq_topk, catalogue, q, K, backend)


@pytest.mark.parametrize("batch", BATCHES)
def bench_split_loop(benchmark, catalogue, batch):
    q = catalogue.queries[:batch].contiguous()
    benchmark.group = f"pq_topk B={batch}"
    benchmark(split_loop_topk, catalogue, q, K)


@pytest.mark.parametrize("batch", BATCHES)
def bench_dense(benchmark, catalogue, batch):
    q = catalogue.queries[:batch].contiguous()
    items = catalogue.item_matrix()
    benchmark.group = f"pq_topk B={batch}"
    benchmark(dense_topk, q, items, K)


@pytest.mark.parametrize("batch", BATCHES)
def bench_faiss(benchmark, catalogue, batch):
    pytest.importorskip("faiss")
    q = catalogue.queries[:batch].contiguous()
    index = faiss_index_pq(catalogue)
    benchmark.group = f"pq_topk B={batch}"
    benchmark(faiss_topk, index, q, K)
