"""The "triton" backend against the reference and brute force.

Without a GPU the kernels run in the Triton interpreter on tiny awkward shapes (tests/conftest.py
sets TRITON_INTERPRET=1 before recjpq is imported). With a GPU the same checks run compiled,
plus full-scale ones. The kernels add splits in the reference's order, so results must be
bit-identical to it, even for random float S.
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton", reason="triton is not installed")

import recjpq  # noqa: E402
from recjpq import ops  # noqa: E402
from recjpq.backends import get  # noqa: E402
from conftest import assert_topk, random_problem  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in recjpq.available_backends(DEVICE):
    pytest.skip(f"the triton backend cannot run on {DEVICE}: "
                f"{get('triton').unavailable_reason(torch.device(DEVICE))}", allow_module_level=True)

gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="full-scale checks need a CUDA GPU")


def _problem(batch, n, m, k_codes, **kw):
    return random_problem(batch, n, m, k_codes, device=DEVICE, **kw)


def _both(S, codes, k, exclude=None):
    got = ops.pq_topk(S, codes, k, exclude=exclude, backend="triton")
    want = ops.pq_topk(S, codes, k, exclude=exclude, backend="reference")
    return got, want


def _assert_same(got, want):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1], want[1])


@pytest.mark.parametrize("shape,dtype", [
    ((3, 300, 3, 16), torch.uint8),
    ((2, 130, 1, 256), torch.uint8),
    ((5, 257, 8, 256), torch.int16),
    ((1, 97, 3, 300), torch.int32),
])
def test_pq_scores_bit_identical_to_reference(shape, dtype):
    S, codes = _problem(*shape, dtype=dtype, seed=shape[1])
    got = ops.pq_scores(S, codes, backend="triton")
    assert torch.equal(got, ops.pq_scores(S, codes, backend="reference"))


@pytest.mark.parametrize("batch,n,m,k_codes,k", [
    (3, 300, 3, 16, 1),
    (2, 1, 3, 16, 1),        # N = 1: Triton would compile N as a constexpr if it specialised sizes
    (1, 2, 1, 16, 2),
    (2, 257, 8, 256, 7),     # N not a multiple of any tile, k not a power of two
    (2, 130, 1, 16, 100),    # one split of 16 codes: every score is tied with many others
    (1, 200, 3, 16, 200),    # k == N
    (2, 193, 3, 16, 190),    # k close to N
    (2, 300, 8, 256, 33),
])
def test_pq_topk_exact_ties(batch, n, m, k_codes, k):
    S, codes = _problem(batch, n, m, k_codes, integer_scores=True, seed=n + k)
    values, indices = ops.pq_topk(S, codes, k, backend="triton")
    assert_topk(S.cpu(), codes.cpu(), k, values.cpu(), indices.cpu(), exact=True)


@pytest.mark.parametrize("batch,n,m,k_codes,k", [(2, 333, 3, 256, 10), (3, 150, 8, 16, 17)])
def test_pq_topk_float_scores_match_reference(batch, n, m, k_codes, k):
    S, codes = _problem(batch, n, m, k_codes, seed=k)
    _assert_same(*_both(S, codes, k))


def test_pq_topk_exclusions_and_short_tail():
    S, codes = _problem(4, 100, 3, 16, integer_scores=True, seed=1)
    exclude = torch.tensor([
        [5, -1, 3, 99, 63, 64, 64],        # duplicates, padding, tile edges (tile = 64 interpreted)
        [-1, -1, -1, -1, -1, -1, -1],      # nothing excluded
        [0, 1, 2, 3, 4, 5, 6],
        [99, 98, 97, 96, 95, 94, 93],
    ], device=DEVICE)
    k = 97  # rows 0, 2 and 3 have fewer than k items left: -inf / -1 tail
    values, indices = ops.pq_topk(S, codes, k, exclude=exclude, backend="triton")
    assert_topk(S.cpu(), codes.cpu(), k, values.cpu(), indices.cpu(), exclude=exclude.cpu(), exact=True)
    assert (indices[0] == -1).sum() == k - (100 - 5)  # 5 distinct ids excluded


def test_pq_topk_above_fused_k_falls_back_exactly():
    from recjpq.backends.triton import MAX_FUSED_K

    S, codes = _problem(1, MAX_FUSED_K + 30, 2, 16, integer_scores=True)
    _assert_same(*_both(S, codes, MAX_FUSED_K + 5))


def test_split_major_copy_is_padded_and_range_checked_on_the_copy():
    from recjpq.backends.triton import _codes_split_major, codes_stride

    assert [codes_stride(n) for n in (1, 16, 17, 1_271_638)] == [16, 16, 32, 1_271_648]
    _, codes = _problem(1, 17, 3, 16, dtype=torch.int16)
    copy = _codes_split_major(codes, 16)
    assert copy.shape == (3, 32) and copy.stride(0) * copy.element_size() % 16 == 0
    assert torch.equal(copy[:, :17], codes.t()) and not copy[:, 17:].any()
    with pytest.raises(ValueError, match=r"codes must lie in \[0, K=8\)"):
        _codes_split_major(codes, 8)  # K smaller than the copy's largest code


def test_stage_one_fills_an_h100_and_bounds_the_candidates():
    """B = 1 at N = 1.27M: at least 4 programs per SM of an H100 (132 SMs); whatever k, stage 2
    merges at most N / 8 keys per query."""
    from recjpq.backends.triton import MAX_FUSED_K, num_splits
    from recjpq.kernels.pq_topk import key_slots

    n, programs = 1_271_638, 4 * 132
    for batch in (1, 4, 16, 64):
        assert num_splits(n, batch, programs, kt=16) * -(-batch // 4) >= programs
    for k in (1, 2, 10, 100, 1000, MAX_FUSED_K):
        for batch in (1, 64):
            assert num_splits(n, batch, programs, kt=key_slots(k)) * key_slots(k) <= n // 8
    assert key_slots(1) == 2 and key_slots(10) == 16 and num_splits(1, 1, programs, kt=2) == 1


def test_deterministic_cross_entropy_backward_matches_the_atomic_one(monkeypatch):
    """Under torch.use_deterministic_algorithms the backward sums per-program slices in a fixed
    order (no float atomics); it must agree with the atomic kernel and repeat bit for bit."""
    from recjpq.kernels import pq_cross_entropy

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the atomic backward kernel ran in deterministic mode")

    triton_backend = get("triton")
    S, codes = _problem(3, 45, 3, 20, seed=4)  # K = 20: a partial code block
    scale = 0.7
    lse = triton_backend.pq_cross_entropy_forward(S, codes, scale)
    grad_lse = torch.tensor([1.0, -0.5, 2.0], device=DEVICE)
    atomic = triton_backend.pq_cross_entropy_backward(S, codes, lse, grad_lse, scale)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    monkeypatch.setattr(pq_cross_entropy, "pq_logsumexp_backward_kernel", NotLaunched())
    try:
        first = triton_backend.pq_cross_entropy_backward(S, codes, lse, grad_lse, scale)
        second = triton_backend.pq_cross_entropy_backward(S, codes, lse, grad_lse, scale)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, atomic, rtol=1e-5, atol=1e-7)
    scores = ops.pq_scores(S, codes, backend="reference") * scale
    want = torch.zeros_like(S)  # d lse / dS[b, m, codes[i, m]] += softmax(scores)[b, i] * scale
    probs = torch.softmax(scores, dim=1) * (grad_lse * scale)[:, None]
    for m in range(S.shape[1]):
        want[:, m].index_add_(1, codes[:, m].long(), probs)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-7)


def test_codes_edited_in_place_are_rescored():
    S, codes = _problem(2, 100, 3, 16, seed=3)
    ops.pq_topk(S, codes, 5, backend="triton")
    codes[::7] = (codes[::7] + 1) % 16  # invalidates the cached split-major copy
    _assert_same(*_both(S, codes, 5))


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 160), m=st.integers(1, 4), k_codes=st.sampled_from([2, 16, 256]),
       k_frac=st.floats(0, 1), n_excl=st.integers(0, 5), seed=st.integers(0, 1000))
def test_pq_topk_fuzz(batch, n, m, k_codes, k_frac, n_excl, seed):
    k = min(n, 1 + int(k_frac * 40))
    S, codes = _problem(batch, n, m, k_codes, integer_scores=seed % 2 == 0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    exclude = torch.randint(-1, n, (batch, n_excl), generator=g).to(DEVICE) if n_excl else None
    _assert_same(*_both(S, codes, k, exclude))


# Full scale, compiled. One (M, K) and three batch/k buckets, so autotuning compiles few kernels.
@gpu_only
@pytest.mark.parametrize("batch,k", [(1, 10), (16, 100), (300, 1000)])
def test_full_scale_matches_reference(batch, k):
    S, codes = _problem(batch, 1_000_003, 32, 256, seed=batch)
    exclude = torch.randint(-1, codes.shape[0], (batch, 50), device=DEVICE)
    _assert_same(*_both(S, codes, k))
    _assert_same(*_both(S, codes, k, exclude))


@gpu_only
def test_full_scale_ties_and_scores():
    S, codes = _problem(16, 2_000_001, 32, 256, integer_scores=True, dtype=torch.int16)
    _assert_same(*_both(S, codes, 100))
    assert torch.equal(ops.pq_scores(S, codes, backend="triton"), ops.pq_scores(S, codes, backend="reference"))


@gpu_only
def test_full_scale_allocates_no_batch_by_items_buffer():
    batch, n = 300, 4_000_000
    S, codes = _problem(batch, n, 32, 256)
    ops.pq_topk(S, codes, 1000, backend="triton")  # warm-up: autotuning and the split-major codes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.pq_topk(S, codes, 1000, backend="triton")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < batch * n * 4 // 16


def _compile_check(*args, timeout=900):
    """python -m recjpq.kernels.compile_check in a fresh process: the kernels must be decorated
    for compiling, not for this process's interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "recjpq.kernels.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_compile_matrix_plans_k1_n1_and_every_kernel():
    """The matrix (scripts/compile_matrix.sh in CI) compiles k = 1 and N = 1, which the
    interpreter runs but the compiler rejected, and every kernel of both backends."""
    result = _compile_check("--arch", "90", "--sample", "--list")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    topk_k1 = [r for r in rows if r.startswith("| pq_topk |") and re.search(r"k=1[ ,]", r)]
    assert topk_k1 and all(re.search(r"N=1[ ,]", r) for r in topk_k1), rows
    for kernel in ("pq_scores", "pq_topk", "pq_logsumexp", "pq_logsumexp_backward", "decode_threshold",
                   "decode_candidates"):
        assert any(r.startswith(f"| {kernel} |") for r in rows), kernel


@pytest.mark.skipif(os.environ.get("RECJPQ_COMPILE_CHECK") != "1",
                    reason="set RECJPQ_COMPILE_CHECK=1 to compile k = 1, N = 1 for sm_90 (minutes on 2 cores, no GPU)")
def test_k1_and_n1_compile_for_sm90_without_spills():
    result = _compile_check("--arch", "90", "--sample", "--no-cuda", "--only", "pq_topk [BLOCK_N=1024 QB=1 w=4 KT=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
