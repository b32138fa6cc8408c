"""pytest-benchmark: the "cpu" backend on each SIMD path and algorithm, beside FAISS and the torch
split loop, on one catalogue (Gowalla-sized by default: N=1,271,638, M=8, K=256, d=512, k=10).

    python -m pytest bench/bench_cpu.py --benchmark-only
Shape from the environment: RECJPQ_BENCH_N, _M, _D, _K.
"""
import os

import pytest
import torch

import recjpq
from bench.peers import Catalogue, faiss_index_pq, faiss_topk, split_loop_topk
from recjpq import ops

if "cpu" not in recjpq.available_backends("cpu"):
    pytest.skip("the cpu backend (recjpq._C) is not built", allow_module_level=True)

from recjpq.backends import cpu  # noqa: E402

N = int(os.environ.get("RECJPQ_BENCH_N", 1_271_638))
M = int(os.environ.get("RECJPQ_BENCH_M", 8))
D = int(os.environ.get("RECJPQ_BENCH_D", 512))
K = int(os.environ.get("RECJPQ_BENCH_K", 10))
BATCHES = (1, 64)
SIMD = [level for level in ("scalar", "avx2", "avx512") if cpu.simd_supported(level)]


@pytest.fixture(scope="module")
def catalogue():
    return Catalogue(N, M, D, max(BATCHES))


def _topk(cat, q, algorithm):
    S = ops.subitem_scores(q, cat.centroids)
    return ops.pq_topk(S, cat.codes, K, backend="cpu", algorithm=algorithm)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("simd", SIMD)
def bench_cpu_exhaustive(benchmark, monkeypatch, catalogue, simd, batch):
    monkeypatch.setenv(cpu.SIMD_ENV, simd)
    q = catalogue.queries[:batch].contiguous()
    benchmark.group = f"cpu pq_topk B={batch}"
    benchmark(_topk, catalogue, q, "exhaustive")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("algorithm", ["auto", "prune"])
def bench_cpu_algorithm(benchmark, catalogue, algorithm, batch):
    q = catalogue.queries[:batch].contiguous()
    benchmark.group = f"cpu pq_topk B={batch}"
    benchmark(_topk, catalogue, q, algorithm)


@pytest.mark.parametrize("batch", BATCHES)
def bench_faiss(benchmark, catalogue, batch):
    pytest.importorskip("faiss")
    q = catalogue.queries[:batch].contiguous()
    index = faiss_index_pq(catalogue)
    benchmark.group = f"cpu pq_topk B={batch}"
    benchmark(faiss_topk, index, q, K)


def bench_split_loop(benchmark, catalogue):
    q = catalogue.queries[:1].contiguous()
    benchmark.group = "cpu pq_topk B=1"
    benchmark(split_loop_topk, catalogue, q, K)


def bench_pq_scores(benchmark, catalogue):
    S = ops.subitem_scores(catalogue.queries[:1].contiguous(), catalogue.centroids)
    benchmark.group = "cpu pq_scores B=1"
    benchmark(ops.pq_scores, S, catalogue.codes, backend="cpu")
    torch.testing.assert_close(ops.pq_scores(S, catalogue.codes, backend="cpu"),
                               ops.pq_scores(S, catalogue.codes, backend="reference"), rtol=0, atol=0)
