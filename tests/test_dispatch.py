"""pq_topk_query's CPU dispatch: the decoded-table ("matmul") path and the fused scan ("lut")
against the reference, and the decoded-table cache."""
import re

import pytest
import torch

from recjpq import ops
from recjpq.nn import PQEmbedding
from recjpq.ops import _decoded


def catalogue(n, m, dsub, num_codes=16, batch=5, dtype=torch.uint8, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, num_codes, (n, m), generator=g).to(dtype)
    if integer:  # small integers: float32 sums are exact in any order, so equal scores tie exactly
        centroids = torch.randint(-2, 3, (m, num_codes, dsub), generator=g).float()
        query = torch.randint(-2, 3, (batch, m * dsub), generator=g).float()
    else:
        centroids = torch.randn(m, num_codes, dsub, generator=g)
        query = torch.randn(batch, m * dsub, generator=g)
    return query, centroids, codes


def assert_matches_reference(query, centroids, codes, k, exclude=None, **kwargs):
    ref = ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, backend="reference")
    got = ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, **kwargs)
    assert torch.equal(got[1], ref[1])
    assert torch.equal(got[0], ref[0])  # bit-identical float32, -inf tail included
    return got


@pytest.mark.parametrize("n, m, dsub, k", [
    (1, 1, 3, 1), (37, 3, 5, 7), (200, 4, 16, 200), (3001, 2, 8, 3), (5000, 8, 4, 10), (4099, 1, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_matmul_matches_reference(n, m, dsub, k, dtype):
    query, centroids, codes = catalogue(n, m, dsub, dtype=dtype)
    assert_matches_reference(query, centroids, codes, k, algorithm="matmul")


@pytest.mark.parametrize("n, m, dsub, k", [(3001, 4, 8, 3), (5000, 32, 2, 10), (20000, 16, 4, 5), (3417, 8, 8, 100),
                                          (700, 3, 7, 690)])
@pytest.mark.parametrize("batch", [1, 3, 70])
@pytest.mark.parametrize("algorithm", ["matmul", "auto"])
def test_matmul_at_every_batch_with_exclusions(monkeypatch, small_calls, n, m, dsub, k, batch, algorithm):
    """Random scores, k near N, exclusions with duplicates and padding. Batches of 1 and 3 take the
    one-call path (with "auto" picking the decoded table, or named), 70 the general one."""
    monkeypatch.setattr(_decoded, "prefers_matmul", lambda *args: True)
    query, centroids, codes = catalogue(n, m, dsub, num_codes=256, batch=batch)
    exclude = torch.randint(-1, n, (batch, 9), generator=torch.Generator().manual_seed(n))
    assert_matches_reference(query, centroids, codes, k, exclude=exclude, algorithm=algorithm)
    assert small_calls["answered"] == int(batch <= 64)


@pytest.mark.parametrize("n, k", [(64, 5), (3001, 10)])
def test_matmul_exact_ties_go_to_the_lower_index(n, k):
    query, centroids, codes = catalogue(n, 2, 2, num_codes=3, integer=True)
    _, indices = assert_matches_reference(query, centroids, codes, k, algorithm="matmul")
    assert (indices >= 0).all()


def test_matmul_exclusions_and_the_empty_tail():
    n, k = 40, 12
    query, centroids, codes = catalogue(n, 3, 4, batch=4)
    exclude = torch.full((4, n + 3), -1, dtype=torch.int64)
    exclude[0, :5] = torch.tensor([0, 39, 0, 17, 3])  # duplicates and both ends
    exclude[1, :n - 5] = torch.arange(5, n)  # 5 items left: 7 slots of (-inf, -1)
    exclude[2, :n] = torch.arange(n)  # nothing left
    values, indices = assert_matches_reference(query, centroids, codes, k, exclude=exclude, algorithm="matmul")
    assert (indices[1, 5:] == -1).all() and torch.isinf(values[1, 5:]).all()
    assert (indices[2] == -1).all()
    assert not torch.isin(indices[0], torch.tensor([0, 39, 17, 3])).any()


def test_matmul_rescores_everything_when_the_margin_proves_nothing():
    """|scores| beyond 2^100 (finite: S ~ 1e32): the margin is not trusted, every allowed item is
    rescored from S, still the reference's answer."""
    query, centroids, codes = catalogue(3001, 4, 8, batch=6)
    query, centroids = query * 1e16, centroids * 1e16
    margins = torch.ops.recjpq_cpu.decoded_margin(query, _decoded.decoded_table(codes, centroids).abs_max, 4)
    assert (margins[:, 1] > 2.0 ** 100).all()  # the case this test is about
    exclude = torch.tensor([[5, -1]] * 6)
    assert_matches_reference(query, centroids, codes, 10, exclude=exclude, algorithm="matmul")


def test_margin_bounds_the_gemm_error():
    """The bound holds against float64 truth for both float32 routes (GEMM and S sums)."""
    query, centroids, codes = catalogue(2000, 8, 64, num_codes=256, batch=16)
    table = _decoded.decoded_table(codes, centroids)
    margin = torch.ops.recjpq_cpu.decoded_margin(query, table.abs_max, 8)[:, 0]
    truth = query.double() @ table.table.double()
    approx = torch.mm(query, table.table).double()
    exact = ops.pq_scores(ops.subitem_scores(query, centroids), codes, backend="reference").double()
    assert ((approx - truth).abs().amax(1) <= margin).all()
    assert ((exact - truth).abs().amax(1) <= margin).all()


@pytest.mark.parametrize("prefers", [True, False])
@pytest.mark.parametrize("batch", [1, 9, 70])
def test_auto_runs_the_branch_the_dispatch_picks(monkeypatch, prefers, batch):
    query, centroids, codes = catalogue(500, 4, 4, batch=batch)
    calls = []
    real = _decoded.decoded_table
    monkeypatch.setattr(_decoded, "prefers_matmul", lambda *args: prefers)
    monkeypatch.setattr(_decoded, "decoded_table", lambda *args: calls.append(1) or real(*args))
    exclude = torch.tensor([[1, 2, -1]] * batch)
    assert_matches_reference(query, centroids, codes, 8, exclude=exclude)
    assert len(calls) == int(prefers)
    calls.clear()
    assert_matches_reference(query, centroids, codes, 8, exclude=exclude, backend="cpu" if prefers else None,
                             algorithm="lut")
    assert not calls  # a named backend or algorithm is obeyed


def test_reduced_matmul_precision_keeps_auto_off_the_decoded_table(monkeypatch):
    query, centroids, codes = catalogue(300, 2, 4)
    monkeypatch.setattr(_decoded, "prefers_matmul", lambda *args: True)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert _decoded.unavailable_reason(query.device) is not None
        with pytest.raises(ValueError, match="reduced precision"):
            ops.pq_topk_query(query, centroids, codes, 3, algorithm="matmul")
    finally:
        torch.set_float32_matmul_precision(previous)


def test_matmul_gradients_match_the_lut_path():
    query, centroids, codes = catalogue(300, 4, 4, batch=3)
    exclude = torch.tensor([[0, -1], [7, 8], [-1, -1]])
    grads = []
    for algorithm in ("lut", "matmul"):
        q, c = query.clone().requires_grad_(), centroids.clone().requires_grad_()
        values, _ = ops.pq_topk_query(q, c, codes, 6, exclude=exclude, algorithm=algorithm)
        (values * torch.arange(1.0, 7.0)).sum().backward()
        grads.append((values.detach(), q.grad, c.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
    torch.testing.assert_close(grads[1][2], grads[0][2])


def test_table_is_cached_per_codes_and_centroids():
    _, centroids, codes = catalogue(100, 2, 4)
    table = _decoded.decoded_table(codes, centroids)
    assert _decoded.decoded_table(codes, centroids) is table
    assert _decoded.decoded_table(codes, centroids.clone()) is not table  # another tensor
    other = _decoded.decoded_table(codes[1:], centroids)  # a view is another catalogue
    assert other.table.shape[1] == 99


def test_clearing_the_tables_reaches_every_threads_last_answer():
    """Each thread checks its last (codes, centroids) first; clear_decoded_tables() from another
    thread (after a hidden .data write, say) must still make it rebuild."""
    import threading

    _, centroids, codes = catalogue(100, 2, 4)
    table = _decoded.decoded_table(codes, centroids)
    assert _decoded.decoded_table(codes, centroids) is table  # this thread's last answer
    worker = threading.Thread(target=_decoded.clear_decoded_tables)
    worker.start()
    worker.join()
    assert _decoded.decoded_table(codes, centroids) is not table


def test_codes_snapshot_follows_a_swapped_storage():
    """The snapshot's fast path (same tensor object as last time) still notices new storage behind
    the same object (``.data`` assignment keeps the version counter)."""
    from recjpq._codes_cache import codes_info

    codes = torch.zeros(70, 3, dtype=torch.int16)
    first = codes_info(codes)
    assert codes_info(codes) is first
    codes.data = torch.full((70, 3), 5, dtype=torch.int16)
    second = codes_info(codes)
    assert second is not first and second.max_code == 5
    codes.data = codes.data[:, :2]  # same storage start, another shape
    assert codes_info(codes).blocked.shape[1] == 2


def test_in_place_edits_invalidate_the_table():
    query, centroids, codes = catalogue(300, 4, 4, batch=3)
    assert_matches_reference(query, centroids, codes, 5, algorithm="matmul")
    table = _decoded.decoded_table(codes, centroids)
    codes[:50] = codes[50:100].flip(0)
    assert _decoded.decoded_table(codes, centroids) is not table
    assert_matches_reference(query, centroids, codes, 5, algorithm="matmul")
    table = _decoded.decoded_table(codes, centroids)
    centroids.mul_(-1.5)
    assert _decoded.decoded_table(codes, centroids) is not table
    assert_matches_reference(query, centroids, codes, 5, algorithm="matmul")
    table = _decoded.decoded_table(codes, centroids)
    codes[1:].view(-1)[:7] = 3  # through a view: the version counter is shared
    assert _decoded.decoded_table(codes, centroids) is not table
    assert_matches_reference(query, centroids, codes, 5, algorithm="matmul")


def test_hidden_codes_writes_leave_the_table_stale_but_in_bounds():
    """A write through numpy() (no version bump) then new centroids: the table is rebuilt from the
    validated snapshot, as the cpu scan reads it, never from the out-of-range values written."""
    query, centroids, codes = catalogue(300, 4, 4, batch=3, dtype=torch.int32)
    snapshot = codes.clone()
    assert_matches_reference(query, centroids, codes, 5, algorithm="matmul")
    codes.numpy()[:, 1] = 2**31 - 1
    centroids = centroids * 2  # another tensor: the decoded table is built again
    got = ops.pq_topk_query(query, centroids, codes, 5, algorithm="matmul")
    want = ops.pq_topk_query(query, centroids, snapshot, 5, backend="reference")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_optimizer_step_invalidates_the_table():
    torch.manual_seed(0)
    emb = PQEmbedding(torch.randint(0, 8, (400, 4), dtype=torch.uint8), 16, num_codes=8, padding_idx=0)
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    seq = torch.randn(6, 16)
    for _ in range(2):
        values, indices = emb.topk(seq, 7, algorithm="matmul")
        ref = emb.topk(seq, 7, backend="reference", algorithm="lut")
        assert torch.equal(values, ref[0]) and torch.equal(indices, ref[1])
        assert not (indices == 0).any()  # padding excluded
        table = _decoded.decoded_table(emb.codes, emb.subitem_embeddings)
        opt.zero_grad()
        (-values.sum()).backward()
        opt.step()
        assert _decoded.decoded_table(emb.codes, emb.subitem_embeddings) is not table


def test_pq_embedding_topk_keeps_leading_dims_and_scan_algorithms():
    torch.manual_seed(1)
    emb = PQEmbedding(torch.randint(0, 8, (90, 2), dtype=torch.uint8), 8, num_codes=8)
    seq = torch.randn(2, 3, 8)
    ref = ops.pq_topk(emb.subitem_scores(seq.reshape(6, 8)), emb.codes, 4, backend="reference")
    for algorithm in ("auto", "lut", "matmul", "exhaustive", "prune"):
        values, indices = emb.topk(seq, 4, algorithm=algorithm)
        assert torch.equal(values, ref[0]) and torch.equal(indices, ref[1]), algorithm


@pytest.mark.parametrize("bad", ["nan query", "inf centroid", "overflow", "code range", "exclude range"])
def test_matmul_rejects_bad_values_before_scoring(bad):
    query, centroids, codes = catalogue(50, 2, 4)
    exclude = None
    if bad == "nan query":
        query[1, 3] = float("nan")
    elif bad == "inf centroid":
        centroids[1, 2, 0] = float("inf")
    elif bad == "overflow":  # finite inputs whose float32 products overflow
        query, centroids = query * 1e30, centroids * 1e30
    elif bad == "code range":
        codes = codes.to(torch.int16)
        codes[3, 1] = 16  # K = 16 sub-ids: 0..15
    else:
        exclude = torch.tensor([[50]] * 5)
    match = {"code range": "codes must lie", "exclude range": "exclude ids"}.get(bad, "non-finite")
    with pytest.raises(ValueError, match=match):
        ops.pq_topk_query(query, centroids, codes, 3, exclude=exclude, algorithm="matmul")


# ---- the one-call path for one or two CPU queries (recjpq.backends.cpu.topk_query_small) ----

@pytest.fixture
def small_calls(monkeypatch):
    """Counts the calls that took the one-call path and the ones it answered."""
    from recjpq.backends import cpu

    counts = {"asked": 0, "answered": 0}
    original = cpu.topk_query_small

    def spy(*args):
        counts["asked"] += 1
        result = original(*args)
        counts["answered"] += result is not None
        return result

    monkeypatch.setattr(cpu, "topk_query_small", spy)
    return counts


@pytest.mark.parametrize("n, m, dsub, k, num_codes", [
    (1, 1, 3, 1, 16), (37, 3, 5, 37, 16), (200, 4, 16, 199, 256), (3001, 7, 2, 3, 300), (4099, 8, 8, 10, 256)])
@pytest.mark.parametrize("batch", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_small_call_matches_reference(small_calls, n, m, dsub, k, num_codes, batch, dtype):
    if dtype == torch.uint8 and num_codes > 256:
        pytest.skip("uint8 codes hold 256 sub-ids")
    query, centroids, codes = catalogue(n, m, dsub, num_codes=num_codes, batch=batch, dtype=dtype, seed=n + batch)
    exclude = torch.randint(-1, n, (batch, 5), generator=torch.Generator().manual_seed(n))
    exclude[:, 1] = exclude[:, 0]  # duplicates and -1 padding
    assert_matches_reference(query, centroids, codes, k)
    assert_matches_reference(query, centroids, codes, k, exclude=exclude)
    assert small_calls == {"asked": 2, "answered": 2}


def test_small_call_ties_exclusions_and_tail(small_calls):
    query, centroids, codes = catalogue(300, 3, 2, num_codes=3, batch=2, integer=True)
    _, indices = assert_matches_reference(query, centroids, codes, 50)
    assert (indices >= 0).all()
    exclude = torch.arange(298).expand(2, 298).contiguous()  # two items left, k = 5
    values, indices = assert_matches_reference(query, centroids, codes, 5, exclude=exclude)
    assert (indices[:, 2:] == -1).all() and torch.isinf(values[:, 2:]).all()
    assert small_calls["answered"] == 2


@pytest.mark.parametrize("case", ["k0", "k_big", "k_bool", "exclude_range", "exclude_dtype", "exclude_rows",
                                  "nan_query", "codes_range", "dim", "codes_float", "exclude_list"])
def test_small_call_raises_the_general_paths_errors(case):
    query, centroids, codes = catalogue(100, 4, 4, batch=1)
    args, kwargs = [query, centroids, codes, 5], {}
    if case == "k0":
        args[3] = 0
    elif case == "k_big":
        args[3] = 101
    elif case == "k_bool":
        args[3] = True
    elif case == "exclude_range":
        kwargs["exclude"] = torch.tensor([[3, 100]])
    elif case == "exclude_dtype":
        kwargs["exclude"] = torch.tensor([[3, 4]], dtype=torch.int32)
    elif case == "exclude_rows":
        kwargs["exclude"] = torch.tensor([[3], [4]])
    elif case == "nan_query":
        args[0] = query.clone().index_fill_(1, torch.tensor([2]), float("nan"))
    elif case == "codes_range":
        args[1] = centroids[:, :8].contiguous()  # codes reach 15
    elif case == "dim":
        args[0] = torch.randn(1, 15)
    elif case == "codes_float":
        args[2] = codes.float()
    elif case == "exclude_list":
        kwargs["exclude"] = [[3]]
    with pytest.raises((ValueError, TypeError)) as general:
        ops.pq_topk_query(*args, backend="cpu", **kwargs)  # a named backend takes the general path
    with pytest.raises(general.type, match=re.escape(str(general.value))):
        ops.pq_topk_query(*args, **kwargs)


def test_small_call_only_where_the_general_path_gives_the_same(small_calls):
    query, centroids, codes = catalogue(500, 4, 4, batch=65)
    ops.pq_topk_query(query, centroids, codes, 5)  # more queries than one call takes
    ops.pq_topk_query(query[:1], centroids, codes, 5, backend="cpu")  # a backend named
    leaf = query[:1].clone().requires_grad_()
    values, _ = ops.pq_topk_query(leaf, centroids, codes, 5)  # a gradient wanted
    values.sum().backward()
    assert leaf.grad is not None and small_calls["asked"] == 0
    strided = query[:2].t().contiguous().t()  # [2, d], not contiguous: asked, declined, then the general path
    assert_matches_reference(strided, centroids, codes, 5)
    assert small_calls == {"asked": 1, "answered": 0}
    with torch.no_grad():
        ops.pq_topk_query(leaf, centroids, codes, 5)  # no gradient under no_grad: taken
    assert small_calls == {"asked": 2, "answered": 1}


def test_small_call_sees_in_place_code_edits(small_calls):
    query, centroids, codes = catalogue(400, 4, 4, batch=1)
    before = ops.pq_topk_query(query, centroids, codes, 3)
    codes[before[1][0, 0]] = codes[before[1][0, 2]]  # the best item now scores as the third
    assert_matches_reference(query, centroids, codes, 3)
    assert small_calls["answered"] == 2


def test_scratch_table_is_reused_per_thread_and_never_returned():
    from recjpq.ops.subitem_scores import _scratch_buffer

    query, centroids, codes = catalogue(700, 4, 4, batch=70)  # more than one C++ call takes: Python's scratch
    first = assert_matches_reference(query, centroids, codes, 5)
    buffer = _scratch_buffer(1, 1)
    second = assert_matches_reference(query * 2, centroids, codes, 5)  # same buffer, new values
    assert _scratch_buffer(1, 1).data_ptr() == buffer.data_ptr()
    assert not torch.equal(first[0], second[0])
    S = ops.subitem_scores(query, centroids)  # the public op returns its own tensor
    assert S.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    leaf = query.clone().requires_grad_()
    values, _ = ops.pq_topk_query(leaf, centroids, codes, 5)  # a gradient wanted: no scratch
    values.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [6, 70])  # C++'s thread-local table, Python's
def test_scratch_tables_of_concurrent_callers_do_not_mix(batch):
    from concurrent.futures import ThreadPoolExecutor

    _, centroids, codes = catalogue(900, 4, 4, batch=1)
    queries = [torch.randn(batch, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [ops.pq_topk_query(q, centroids, codes, 7, backend="reference") for q in queries]

    def run(i):
        answers = [ops.pq_topk_query(queries[i], centroids, codes, 7)[1] for _ in range(15)]
        return all(torch.equal(answer, expected[i][1]) for answer in answers)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(8)))


@pytest.mark.parametrize("batch", [1, 5, 70])  # the C++ table; one C++ call with at::bmm; Python's scratch
def test_values_are_the_same_with_and_without_a_gradient(batch):
    query, centroids, codes = catalogue(600, 4, 4, batch=batch)
    with torch.no_grad():
        plain = ops.pq_topk_query(query, centroids, codes, 6)
    leaf = query.clone().requires_grad_()
    traced = ops.pq_topk_query(leaf, centroids, codes, 6)
    assert torch.equal(traced[0].detach(), plain[0]) and torch.equal(traced[1], plain[1])
