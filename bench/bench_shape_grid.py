"""pytest-benchmark: recjpq's default ``pq_topk_query`` beside its peers on a few cells of the
shape grid (``bench/shape_grid.py`` runs the whole grid and prints the speed-up table).

    python -m pytest bench/bench_shape_grid.py --benchmark-only -c bench/pytest.ini
Cells from the environment: RECJPQ_GRID_CELLS="N,B,d,M,k;N,B,d,M,k" (default: the converted
ML-1M SASRec shape at B = 1 and 128, and a 1M-item catalogue at B = 1 and 64).
RECJPQ_BENCH_THREADS sets torch's and FAISS's threads (default: torch's default for both).
"""
import os

import pytest
import torch

from bench.peers import Catalogue, dense_topk, faiss_index_pq, faiss_topk, split_loop_topk
from recjpq import ops

DEFAULT = "3417,1,64,8,10;3417,128,64,8,10;1000000,1,128,16,10;1000000,64,128,16,10"
CELLS = [tuple(int(x) for x in cell.split(",")) for cell in os.environ.get("RECJPQ_GRID_CELLS", DEFAULT).split(";")]
METHODS = ["recjpq", "dense", "faiss", "split_loop"]
THREADS = int(os.environ.get("RECJPQ_BENCH_THREADS", torch.get_num_threads()))


@pytest.fixture(scope="module", autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        import faiss
        faiss.omp_set_num_threads(THREADS)
    except ImportError:
        pass
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def catalogues():
    cache = {}

    def get(n, d, m, batch):
        key = (n, d, m)
        if key not in cache:
            cache.clear()  # one catalogue in memory at a time
            cat = Catalogue(n, m, d, max(c[1] for c in CELLS))
            cache[key] = (cat, cat.item_matrix())
        cat, items = cache[key]
        return cat, items, cat.queries[:batch].contiguous()
    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: "N{}-B{}-d{}-M{}-k{}".format(*c))
def bench_grid_cell(benchmark, catalogues, cell, method):
    n, batch, d, m, k = cell
    cat, items, q = catalogues(n, d, m, batch)
    benchmark.group = "N={} B={} d={} M={} k={}".format(*cell)
    if method == "recjpq":
        result = benchmark(ops.pq_topk_query, q, cat.centroids, cat.codes, k)
        expected = ops.pq_topk_query(q, cat.centroids, cat.codes, k, backend="reference")
        assert torch.equal(result[1], expected[1]) and torch.equal(result[0], expected[0])
    elif method == "dense":
        benchmark(dense_topk, q, items, k)
    elif method == "faiss":
        pytest.importorskip("faiss")
        benchmark(faiss_topk, faiss_index_pq(cat), q, k)
    else:
        benchmark(split_loop_topk, cat, q, k)
