"""pytest-benchmark: the triton backend's pq_topk against the GPU peers (skips without CUDA).

Shape from the environment: RECJPQ_BENCH_N, _M, _K (defaults 1e6, 32, 10); batches 1 and 64.
    python -m pytest bench/bench_triton.py --benchmark-only
The full sweep of the GPU issue, with memory and lookup-ceiling figures, is bench/gpu_bench.py.
"""
import os

import pytest
import torch

import recjpq
from bench.peers import recjpq_topk, split_loop_topk

if not torch.cuda.is_available() or "triton" not in recjpq.available_backends("cuda"):
    pytest.skip("the triton backend benchmarks need a CUDA GPU", allow_module_level=True)

from bench.gpu_bench import D, GpuCatalogue, dense_bf16_topk  # noqa: E402  (imports triton.testing)

N = int(float(os.environ.get("RECJPQ_BENCH_N", 1_000_000)))
M = int(os.environ.get("RECJPQ_BENCH_M", 32))
K = int(os.environ.get("RECJPQ_BENCH_K", 10))
BATCHES = (1, 64)


@pytest.fixture(scope="module")
def catalogue():
    return GpuCatalogue(N, M, D, max(BATCHES))


def _synced(fn, *args):
    out = fn(*args)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name,fn", [
    ("triton", lambda cat, q: recjpq_topk(cat, q, K, backend="triton")),
    ("dense_bf16", lambda cat, q: dense_bf16_topk(cat, q, K)),
    ("split_loop", lambda cat, q: split_loop_topk(cat, q, K)),
])
def bench_gpu_topk(benchmark, catalogue, batch, name, fn):
    q = catalogue.queries[:batch].contiguous()
    benchmark.group = f"gpu pq_topk N={N} M={M} k={K} B={batch}"
    benchmark(_synced, fn, catalogue, q)
