"""The "cpu" backend (C++ kernels) against the reference backend and the brute-force oracle,
on every SIMD path this CPU has, exhaustive and pruned."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from recjpq import backends, ops
from tests.conftest import brute_force_topk, random_problem

if backends._reason("cpu", "cpu") is not None:
    pytest.skip(f"cpu backend unavailable: {backends._reason('cpu', 'cpu')}", allow_module_level=True)

from bench import fuzz_ops  # noqa: E402
import recjpq._C  # noqa: E402
from recjpq.backends import cpu  # noqa: E402

SIMD = [pytest.param(level, marks=pytest.mark.skipif(not cpu.simd_supported(level), reason=f"CPU lacks {level}"))
        for level in ("scalar", "avx2", "avx512")]
ALGORITHMS = ("exhaustive", "prune", "auto")


@pytest.fixture(params=SIMD)
def simd(request, monkeypatch):
    monkeypatch.setenv(cpu.SIMD_ENV, request.param)
    assert cpu.simd_level() == request.param
    return request.param


def assert_same_topk(S, codes, k, exclude=None, algorithm="exhaustive"):
    values, indices = ops.pq_topk(S, codes, k, exclude=exclude, backend="cpu", algorithm=algorithm)
    ref_values, ref_indices = ops.pq_topk(S, codes, k, exclude=exclude, backend="reference")
    torch.testing.assert_close(indices, ref_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)


def random_exclude(batch, n, width, seed):
    g = torch.Generator().manual_seed(seed)
    exclude = torch.randint(-1, n, (batch, width), generator=g)
    exclude[:, 0] = -1  # padding entries mixed in
    return exclude


# N not a multiple of the 64-item block nor of the 2048-item chunk; M odd; K from tiny to > 256
SHAPES = [(1, 1, 1, 1, 1), (3, 63, 3, 5, 7), (2, 130, 1, 256, 130), (4, 2049, 5, 17, 10),
          (5, 4097, 8, 256, 33), (2, 1000, 7, 300, 999), (1, 70_001, 8, 256, 10)]


@pytest.mark.parametrize("batch,n,m,num_codes,k", SHAPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_topk_matches_reference(simd, batch, n, m, num_codes, k, algorithm):
    S, codes = random_problem(batch, n, m, num_codes, seed=n + m)
    assert_same_topk(S, codes, k, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_ties_and_exclusions(simd, algorithm, dtype):
    # integer scores: sums are exact and ties abound, so only the lower-index rule orders them
    S, codes = random_problem(6, 3001, 3, 7, seed=1, integer_scores=True, dtype=dtype)
    exclude = random_exclude(6, 3001, 40, seed=2)
    assert_same_topk(S, codes, 50, exclude, algorithm)
    values, indices = ops.pq_topk(S, codes, 50, exclude=exclude, backend="cpu", algorithm=algorithm)
    expected_values, expected_indices = brute_force_topk(S, codes, 50, exclude)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fewer_items_than_k_after_exclusion(simd, algorithm):
    S, codes = random_problem(2, 9, 2, 4, seed=3, integer_scores=True)
    exclude = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [-1, -1, -1, -1, -1, -1, 8]])
    values, indices = ops.pq_topk(S, codes, 9, exclude=exclude, backend="cpu", algorithm=algorithm)
    assert indices[0, 2:].eq(-1).all() and values[0, 2:].eq(float("-inf")).all()
    assert set(indices[0, :2].tolist()) == {7, 8} and 8 not in indices[1].tolist()
    assert_same_topk(S, codes, 9, exclude, algorithm)


def test_peaked_tables_prune_exactly():
    # a few large entries per split: the regime where pruning stops early
    S, codes = random_problem(3, 50_000, 8, 256, seed=4)
    S[:, :, :4] += 20.0
    assert_same_topk(S, codes, 10, algorithm="prune")
    _, _, visited = _prune_raw(S, codes, 10, max_visits=codes.shape[0])
    assert (visited > 0).all() and (visited < codes.shape[0] // 4).all()


def _prune_raw(S, codes, k, max_visits):
    offsets, items, rows = cpu.prune_index(cpu.snapshot(codes, S.shape[2]), S.shape[2])
    return torch.ops.recjpq_cpu.pq_topk_prune(S, rows, offsets, items, k, None, max_visits)


def test_prune_budget_falls_back_to_exhaustive():
    S, codes = random_problem(4, 20_000, 4, 64, seed=5)
    _, _, visited = _prune_raw(S, codes, 10, max_visits=100)
    assert (visited == -1).all()  # random tables: no query proves its top-k within 100 items
    values, indices = cpu._pruned(S, cpu.snapshot(codes, 64), 10, None, max_visits=100)
    ref_values, ref_indices = ops.pq_topk(S, codes, 10, backend="reference")
    assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)


@pytest.mark.parametrize("batch,n,m,num_codes", [(1, 1, 1, 1), (3, 65, 5, 300), (2, 4100, 8, 256)])
def test_scores_match_reference(simd, batch, n, m, num_codes):
    S, codes = random_problem(batch, n, m, num_codes, seed=6)
    scores = ops.pq_scores(S, codes, backend="cpu")
    assert torch.equal(scores, ops.pq_scores(S, codes, backend="reference"))


def test_layout_rebuilt_after_in_place_edit():
    S, codes = random_problem(2, 500, 4, 16, seed=7)
    before = ops.pq_scores(S, codes, backend="cpu")
    codes[::3] = (codes[::3] + 1) % 16
    after = ops.pq_scores(S, codes, backend="cpu")
    assert not torch.equal(before, after)
    assert torch.equal(after, ops.pq_scores(S, codes, backend="reference"))


@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1e30])
def test_extreme_score_scales(simd, scale):
    """Subnormal and huge S: the VBMI filter's byte table divides by a step of S's spread."""
    S, codes = random_problem(3, 700, 8, 256, seed=5)
    S = S * scale
    assert_same_topk(S, codes, 10)


@pytest.mark.parametrize("algorithm", ("exhaustive", "prune"))
@pytest.mark.parametrize("bad", ["nan", "inf", "exclude below -1", "exclude = N"])
def test_kernels_check_the_values_they_scan(simd, algorithm, bad):
    """recjpq.ops skips its Python pass over S and exclude for this backend: the C++ ops check the
    data they scan, with the same ValueErrors, and their results stay right when nothing is bad."""
    S, codes = random_problem(2, 300, 4, 16, seed=3)
    exclude = random_exclude(2, 300, 5, seed=3)
    if bad in ("nan", "inf"):
        S[1, 2, 7] = float(bad)
    else:
        exclude[1, 3] = -2 if bad == "exclude below -1" else 300
    match = "S contains non-finite" if bad in ("nan", "inf") else r"exclude ids must be in \[-1, N=300\)"
    with pytest.raises(ValueError, match=match):
        ops.pq_topk(S, codes, 10, exclude=exclude, backend="cpu", algorithm=algorithm)


def test_forcing_a_bad_simd_path_is_a_clear_error(monkeypatch):
    S, codes = random_problem(1, 10, 2, 4)
    monkeypatch.setenv(cpu.SIMD_ENV, "sse9")
    with pytest.raises(ValueError, match=cpu.SIMD_ENV):
        ops.pq_topk(S, codes, 3, backend="cpu")
    missing = [level for level in ("avx2", "avx512") if not cpu.simd_supported(level)]
    if missing:
        monkeypatch.setenv(cpu.SIMD_ENV, missing[0])
        with pytest.raises(RuntimeError, match="does not support"):
            ops.pq_topk(S, codes, 3, backend="cpu")


def test_auto_backend_on_cpu_is_cpu():
    assert backends.resolve(None, torch.device("cpu"), "pq_topk") == "cpu"


@pytest.mark.parametrize("call", ["op", "one_call"])
def test_kernels_release_the_gil(call):
    # With a 10 s switch interval the main thread cannot take the GIL from the worker unless the
    # kernel releases it, so the counter moves during the call only if the GIL was released.
    S, codes = random_problem(8, 400_000, 8, 256, seed=8)
    blocked = cpu.snapshot(codes, 256).blocked
    query, centroids = torch.randn(1, 64), torch.randn(8, 256, 8)
    counter, spans = [0], []
    started, finished = threading.Event(), threading.Event()

    def worker():  # calls until the counter moved during one (a call can end before the OS runs the main thread)
        started.set()
        try:
            calls()
        finally:
            finished.set()

    def calls():
        for _ in range(100):
            before = counter[0]
            if call == "op":
                torch.ops.recjpq_cpu.pq_topk(S, blocked, codes.shape[0], 10, None, "auto")
            else:  # the pybind call of one or two queries (ops.pq_topk_query's)
                assert recjpq._C.pq_topk_query_small(query, centroids, blocked, codes.shape[0], 10, None, "auto", 2)
            spans.append(counter[0] - before)
            if spans[-1] > 0:
                break

    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        started.wait()
        while not finished.is_set():
            counter[0] += 1
            finished.wait(0.0001)
        thread.join()
    finally:
        sys.setswitchinterval(old)
    assert max(spans) > 0


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 300), m=st.integers(1, 5), num_codes=st.integers(1, 40),
       k_frac=st.floats(0, 1), width=st.integers(0, 6), seed=st.integers(0, 2**16),
       algorithm=st.sampled_from(ALGORITHMS), integer_scores=st.booleans())
def test_fuzz_against_brute_force(batch, n, m, num_codes, k_frac, width, seed, algorithm, integer_scores):
    S, codes = random_problem(batch, n, m, num_codes, seed=seed, integer_scores=integer_scores)
    k = max(1, round(k_frac * n))
    exclude = random_exclude(batch, n, width, seed) if width else None
    assert_same_topk(S, codes, k, exclude, algorithm)


@settings(max_examples=100, deadline=None)
@given(case=fuzz_ops.cases())
def test_fuzz_ops_against_reference(case):
    # bench/fuzz_ops.py runs the same cases by the ten thousand (docs/cpu-kernel.md)
    fuzz_ops.check_case(case)


@pytest.mark.parametrize("threads", [1, 3, 4])
def test_result_does_not_depend_on_the_thread_count(threads):
    # more helpers than cores: chunks land on threads in any order, the merge must not care
    S, codes = random_problem(3, 70_001, 8, 256, seed=9, integer_scores=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_same_topk(S, codes, 20, random_exclude(3, 70_001, 9, seed=9))
        assert torch.equal(ops.pq_scores(S, codes, backend="cpu"), ops.pq_scores(S, codes, backend="reference"))
    finally:
        torch.set_num_threads(before)


def test_concurrent_callers_share_the_helper_pool():
    S, codes = random_problem(2, 50_000, 8, 256, seed=10)
    expected = ops.pq_topk(S, codes, 10, backend="reference")
    results = []

    def caller():
        for _ in range(10):
            results.append(ops.pq_topk(S, codes, 10, backend="cpu"))

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(results) == 40 and all(torch.equal(r[1], expected[1]) for r in results)


def test_forked_child_runs_without_the_parents_helpers():
    # the child has none of the parent's pool threads; the caller does the work itself, no deadlock
    script = (
        "import os, torch\n"
        "from recjpq import ops\n"
        "S = torch.randn(1, 8, 256); codes = torch.randint(0, 256, (200_000, 8), dtype=torch.uint8)\n"
        "expected = ops.pq_topk(S, codes, 10, backend='cpu')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ok = torch.equal(ops.pq_topk(S, codes, 10, backend='cpu')[1], expected[1])\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n")
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("batch, m, num_codes, dsub", [(1, 8, 256, 8), (2, 3, 17, 5), (3, 5, 300, 19), (1, 1, 1, 1),
                                                     (2, 2, 9, 64), (1, 4, 8, 3), (70, 32, 256, 2), (130, 16, 250, 4),
                                                     (65, 2, 33, 8), (9, 3, 15, 7), (3, 2, 40, 9),
                                                     # d/M = 16..128 in steps of 8: the query's chunks
                                                     # in registers; 136: past them, the general loop
                                                     (1, 8, 256, 64), (2, 3, 21, 16), (1, 2, 19, 128),
                                                     (1, 2, 12, 136)])
def test_subitem_scores_kernel_has_one_order_at_every_simd_level_and_batch(batch, m, num_codes, dsub):
    """The vector paths (across dimensions for d/M > 8, across sub-ids up to 8) reproduce the scalar
    reference (eight fma lanes, then a fixed tree) bit for bit, K and d/M not multiples of 8 or 16
    included, and a query scores the same alone or in a batch (batches over 64 shared by threads)."""
    g = torch.Generator().manual_seed(batch * 1000 + dsub)
    query, centroids = torch.randn(batch, m * dsub, generator=g), torch.randn(m, num_codes, dsub, generator=g)
    levels = [level for level in ("scalar", "avx2", "avx512") if cpu.simd_supported(level)]
    tables = [torch.ops.recjpq_cpu.subitem_scores(query, centroids, level) for level in levels]
    bits = [table.view(torch.int32) for table in tables]  # the sign of a zero included
    for table in bits[1:]:
        assert torch.equal(table, bits[0])
    alone = torch.cat([torch.ops.recjpq_cpu.subitem_scores(query[i:i + 1], centroids, levels[-1]) for i in range(batch)])
    assert torch.equal(alone.view(torch.int32), bits[0])
    exact = torch.einsum("bmd,mkd->bmk", query.view(batch, m, dsub).double(), centroids.double())
    torch.testing.assert_close(tables[0].double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dsub", [9, 17, 8, 16])  # a partial last chunk after full ones; 8: across sub-ids; 16: whole chunks
def test_subitem_scores_kernel_keeps_negative_zero_lanes(dsub):
    """Products that underflow to -0: the lanes past d/M in a partial chunk must keep their -0
    as the scalar reference does (a table of -0 and +0 entries, equal bit for bit on every path)."""
    query = torch.full((1, 2 * dsub), -1e-30)
    centroids = torch.full((2, 16, dsub), 1e-30)  # K >= 8: the vector path scores 8 rows at once
    centroids[1, 2, 0] = -1e-30  # one +0 lane among the -0 ones
    levels = [level for level in ("scalar", "avx2", "avx512") if cpu.simd_supported(level)]
    tables = [torch.ops.recjpq_cpu.subitem_scores(query, centroids, level).view(torch.int32) for level in levels]
    assert torch.equal(tables[0], torch.ops.recjpq_cpu.subitem_scores(query, centroids, "scalar").view(torch.int32))
    assert (tables[0] == torch.tensor(-0.0).view(torch.int32)).any()  # the case this test is about
    for table in tables[1:]:
        assert torch.equal(table, tables[0])


@pytest.mark.parametrize("shape", [(1, 512), (3, 5, 24), (24,), (0, 24)])
def test_subitem_scores_kernel_matches_einsum(shape):
    query, centroids = torch.randn(*shape), torch.randn(8, 300, shape[-1] // 8)
    S = ops.subitem_scores(query, centroids)  # float32, no grad: the C++ kernel
    chunks = query.reshape(*shape[:-1], 8, shape[-1] // 8)
    torch.testing.assert_close(S, torch.einsum("...md,mkd->...mk", chunks, centroids), rtol=1e-5, atol=1e-5)
    centroids.requires_grad_()
    ops.subitem_scores(query, centroids).sum().backward()  # needs a gradient: einsum, differentiable
    assert centroids.grad is not None
