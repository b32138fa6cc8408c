"""The "cuda" backend. Everywhere: launch plans, argument checks, candidate merging, dispatch, the
selection algorithm (a Python model of the kernel's steps) and the kernel sources themselves, run
on CPU threads by csrc/cuda/host_emulation (needs g++ and the CUDA headers). On a GPU: the real
kernels against the reference; those tests skip without one."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import assert_topk, random_problem
from test_cuda_compile import CSRC, NVCC, cuda_include_dir
from recjpq import backends, ops
from recjpq.backends import _gpu_dispatch, cuda, reference
from recjpq.topk_keys import EMPTY_KEY, pack_keys

H100 = cuda.DeviceLimits(sm_count=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024)
A100 = cuda.DeviceLimits(sm_count=108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024)


# --------------------------------------------------------------------------------------------
# Launch plans and the limits checked before a launch.

@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 5000), n=st.integers(1, 10**8), m=st.sampled_from([1, 3, 8, 16, 32, 64]),
       num_codes=st.sampled_from([16, 256, 1024]), k=st.one_of(st.none(), st.integers(1, cuda.MAX_K)),
       limits=st.sampled_from([H100, A100]))
def test_plan_respects_kernel_limits(batch, n, m, num_codes, k, limits):
    k = None if k is None else min(k, n)
    try:
        p = cuda.plan(batch, n, m, num_codes, limits, k)
    except ValueError as e:  # only when even one query's S table (and buffer) cannot fit
        assert "shared memory" in str(e)
        assert cuda.smem_bytes(m, num_codes, 1, 0 if k is None else cuda.buffer_len(k)) > limits.smem_per_block - 1024
        return
    assert p.query_group in cuda.QUERY_GROUPS and (p.query_group == 1 or p.query_group < 2 * batch)
    assert p.smem == cuda.smem_bytes(m, num_codes, p.query_group, p.buffer_len)
    assert p.smem + 1024 <= limits.smem_per_block
    assert 1 <= p.grid_x <= -(-n // cuda.THREADS)
    assert -(-batch // p.query_group) <= cuda.MAX_QUERY_GROUPS
    if k is None:
        assert p.buffer_len == 0
    else:  # a power of two that holds k kept keys plus one full tile
        assert p.grid_x == 1 or p.grid_x * k <= n // 8  # the final merge stays well below N keys
        assert p.buffer_len & (p.buffer_len - 1) == 0 and p.buffer_len >= k + cuda.THREADS


def test_candidates_stay_well_below_n_whatever_k():
    n = 1_271_638
    assert cuda.plan(1, n, 8, 256, H100, k=10).grid_x * 10 <= n // 8
    large = cuda.plan(1, n, 8, 256, H100, k=1024)
    assert large.grid_x >= H100.sm_count and large.grid_x * 1024 <= n // 8


def test_plan_rejects_k_above_limit():
    with pytest.raises(ValueError, match="k must be <= 1024"):
        cuda.plan(1, 10**6, 8, 256, H100, k=1025)


def test_plan_rejects_tables_too_big_for_shared_memory():
    with pytest.raises(ValueError, match=r"S of shape \[B, M=64, K=1024\].*shared memory"):
        cuda.plan(1, 1000, 64, 1024, H100, k=10)


def test_plan_rejects_too_many_items():
    with pytest.raises(ValueError, match="N <= 4294967295"):
        cuda.plan(1, 1 << 32, 8, 256, H100, k=10)


def test_plan_rejects_too_many_query_groups():
    # M=64, K=1024 with k=1024 fits one query per CTA only: B is capped at gridDim.y's limit
    big = cuda.DeviceLimits(132, 400 * 1024, 400 * 1024)
    with pytest.raises(ValueError, match="S must have B <= 65535"):
        cuda.plan(65536, 1000, 64, 1024, big, k=1024)


def test_plan_shares_code_loads_only_when_the_batch_has_queries_to_share():
    assert cuda.plan(1, 10**7, 32, 256, H100, k=10).query_group == 1
    assert cuda.plan(64, 10**7, 8, 256, H100, k=10).query_group == 4
    assert cuda.plan(64, 10**7, 8, 256, H100, k=10).grid_x * 16 >= H100.sm_count  # the grid fills the GPU


def test_unavailable_off_cuda_tensors():
    assert "CUDA tensors only" in cuda.unavailable_reason(torch.device("cpu"))
    assert "cuda" not in backends.available("cpu")
    S, codes = random_problem(1, 10, 2, 4)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run pq_topk on cpu tensors"):
        ops.pq_topk(S, codes, 3, backend="cuda")


# --------------------------------------------------------------------------------------------
# Candidate merging, exclusion rows and the selection algorithm, on CPU.

def test_device_value_checks_assert_on_device(monkeypatch):
    """The GPU path of check_values (RECJPQ_DEVICE_CHECKS=async) asserts on the device instead of
    copying results to the host; on CPU tensors torch._assert_async raises at once."""
    from recjpq._validate import check_values_on_device, device_checks_mode

    S = torch.zeros(2, 3, 4)
    check_values_on_device(S, 10, torch.tensor([[-1, 9], [0, 3]]))
    with pytest.raises(RuntimeError, match="non-finite"):
        check_values_on_device(S.index_put((torch.tensor([1]),), torch.tensor(float("nan"))), 10)
    for bad in (10, -2):
        with pytest.raises(RuntimeError, match=r"exclude ids must be in \[-1, N=10\)"):
            check_values_on_device(S, 10, torch.tensor([[0, bad], [1, 2]]))
    monkeypatch.delenv("RECJPQ_DEVICE_CHECKS", raising=False)
    assert device_checks_mode() == "async"
    monkeypatch.setenv("RECJPQ_DEVICE_CHECKS", "never")
    with pytest.raises(ValueError, match="RECJPQ_DEVICE_CHECKS"):
        device_checks_mode()


def test_sorted_exclusions():
    assert cuda.sorted_exclusions(None) is None
    assert cuda.sorted_exclusions(torch.empty(2, 0, dtype=torch.int64)) is None
    rows = torch.tensor([[5, -1, 2], [-1, -1, 0]])
    assert torch.equal(cuda.sorted_exclusions(rows), torch.tensor([[-1, 2, 5], [-1, -1, 0]]))


def _emulate_candidates(S, codes, k, exclude, p: cuda.Plan):
    """The pq_topk kernel's steps in Python, CTA by CTA in lockstep over tiles: threshold filter,
    buffer shrink to k, per-query global threshold; returns its ``[B, grid_x, k]`` candidates."""
    batch, n = S.shape[0], codes.shape[0]
    keys = pack_keys(reference.pq_scores(S, codes), torch.arange(n).expand(batch, n))
    for b in range(batch if exclude is not None else 0):
        keys[b, exclude[b][exclude[b] >= 0]] = EMPTY_KEY
    tiles = -(-n // cuda.THREADS)
    global_threshold = [EMPTY_KEY] * batch
    local = {(b, c): (EMPTY_KEY, []) for b in range(batch) for c in range(p.grid_x)}

    def shrink(b, c):
        threshold, buf = local[b, c]
        buf = sorted(buf, reverse=True)[:k]
        if len(buf) == k:
            threshold = max(threshold, buf[-1])
            global_threshold[b] = max(global_threshold[b], buf[-1])
        local[b, c] = (threshold, buf)

    for step in range(-(-tiles // p.grid_x)):
        for c in range(p.grid_x):
            tile = c + step * p.grid_x
            if tile >= tiles:
                continue
            for b in range(batch):
                threshold = max(local[b, c][0], global_threshold[b])
                tile_keys = keys[b, tile * cuda.THREADS:(tile + 1) * cuda.THREADS]
                passed = tile_keys[(tile_keys > threshold) & (tile_keys != EMPTY_KEY)].tolist()
                buf = local[b, c][1] + passed
                assert len(buf) <= p.buffer_len, "the kernel's buffer would overflow"
                local[b, c] = (threshold, buf)
                if len(buf) > p.buffer_len - cuda.THREADS:
                    shrink(b, c)
    out = torch.full((batch, p.grid_x, k), EMPTY_KEY)
    for (b, c), (_, buf) in local.items():
        shrink(b, c)
        kept = local[b, c][1]
        out[b, c, :len(kept)] = torch.tensor(kept, dtype=torch.int64)
    return out


@pytest.mark.parametrize("batch,n,m,k,integer", [
    (3, 5000, 3, 7, True),  # many ties: ties must go to the lower index
    (2, 3001, 5, 300, False),  # k > THREADS, N not a multiple of the tile
    (1, 700, 2, 700, True),  # k == N
    (2, 4000, 4, 1024, False),  # the largest k
])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_emulated_selection_matches_reference(batch, n, m, k, integer, with_exclude):
    S, codes = random_problem(batch, n, m, 16, seed=n + k, integer_scores=integer)
    exclude = None
    if with_exclude:
        g = torch.Generator().manual_seed(k)
        exclude = torch.randint(-1, n, (batch, 40), generator=g)
    limits = cuda.DeviceLimits(sm_count=3, smem_per_block=227 * 1024, smem_per_sm=228 * 1024)
    p = cuda.plan(batch, n, m, 16, limits, k)
    p = dataclasses.replace(p, grid_x=max(p.grid_x, 2))  # several CTAs even where the cap on candidates gives one
    values, indices = cuda.merge_candidates(_emulate_candidates(S, codes, k, exclude, p), k)
    ref_values, ref_indices = reference.pq_topk(S, codes, k, exclude)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_merge_candidates_pads_missing_items():
    keys = pack_keys(torch.tensor([[[2.0, 1.0]], [[3.0, 0.5]]]), torch.tensor([[[4, 9]], [[0, 1]]]))
    cand = torch.cat([keys, torch.full((2, 1, 2), EMPTY_KEY)], dim=1)  # [B=2, grid_x=2, k=2]
    values, indices = cuda.merge_candidates(cand, 3)
    assert torch.equal(values, torch.tensor([[2.0, 1.0, float("-inf")], [3.0, 0.5, float("-inf")]]))
    assert torch.equal(indices, torch.tensor([[4, 9, -1], [0, 1, -1]]))


# --------------------------------------------------------------------------------------------
# The kernel sources on CPU threads (csrc/cuda/host_emulation/emulate.cpp).

class EmulatedKernels:
    """ctypes calls of the emulated launchers, with the plan cuda.py would pick."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.emulate_pq_topk_candidates.argtypes = [P, P, I, P, I64, I64, I, I, I64, I, I, I, I, P, P]
        self.lib.emulate_pq_scores.argtypes = [P, P, I, I64, I, I, I64, P, I, I]
        self.lib.emulate_warp_append.argtypes = [P, P, I, P]
        self.lib.emulate_codes_vector_bytes.argtypes = [P, I, I]

    @staticmethod
    def _ptr(t):
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    def topk_candidates(self, S, codes, k, exclude, p: cuda.Plan, buffer_len=None, code_bytes=None):
        """Returns (status, candidates [B, grid_x, k]); status 0 = ran, 1 = arguments rejected."""
        batch, m, num_codes = S.shape
        excl = cuda.sorted_exclusions(exclude)
        thresholds = torch.full((batch,), EMPTY_KEY)
        cand = torch.empty(batch, p.grid_x, k, dtype=torch.int64)
        status = self.lib.emulate_pq_topk_candidates(
            self._ptr(S), self._ptr(codes), code_bytes or codes.element_size(), self._ptr(excl),
            0 if excl is None else excl.shape[1], batch, m, num_codes, codes.shape[0], k,
            buffer_len or p.buffer_len, p.query_group, p.grid_x, self._ptr(thresholds), self._ptr(cand))
        return status, cand

    def scores(self, S, codes, p: cuda.Plan):
        out = torch.empty(S.shape[0], codes.shape[0])
        status = self.lib.emulate_pq_scores(self._ptr(S), self._ptr(codes), codes.element_size(), S.shape[0],
                                            S.shape[1], S.shape[2], codes.shape[0], self._ptr(out),
                                            p.query_group, p.grid_x)
        return status, out

    def codes_vector_bytes(self, codes, offset_bytes=0):
        return self.lib.emulate_codes_vector_bytes(ctypes.c_void_p(codes.data_ptr() + offset_bytes),
                                                   codes.element_size(), codes.shape[1])

    def warp_append(self, keys, passing):
        """warp_append on one CTA, ``keys``/``passing`` of shape [rounds, THREADS]: (count, buffer)."""
        keys, passing = keys.contiguous(), passing.to(torch.uint8).contiguous()
        out = torch.full((keys.numel(),), EMPTY_KEY)
        count = self.lib.emulate_warp_append(self._ptr(keys), self._ptr(passing), keys.shape[0], self._ptr(out))
        return count, out


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None or NVCC is None:
        pytest.skip("the host emulation needs g++ and the CUDA headers (found with nvcc)")
    path = tmp_path_factory.mktemp("cuda_emulation") / "emulate.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           "-DRECJPQ_HOST_EMULATION", f"-I{CSRC}", f"-I{cuda_include_dir()}",
           os.path.join(CSRC, "host_emulation", "emulate.cpp"), "-o", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return EmulatedKernels(path)


FEW_SMS = cuda.DeviceLimits(sm_count=2, smem_per_block=227 * 1024, smem_per_sm=228 * 1024)


def two_ctas(p: cuda.Plan) -> cuda.Plan:
    """Two CTAs per query group: each scans many tiles, so buffers shrink and thresholds rise."""
    return dataclasses.replace(p, grid_x=2)


@pytest.mark.parametrize("batch,n,m,num_codes,k,dtype,integer", [
    (1, 3000, 3, 256, 7, torch.uint8, True),  # QB=1, scalar code loads, ties
    (5, 2049, 16, 256, 100, torch.uint8, False),  # QB=4 with a partial group, 16-byte loads
    (3, 1500, 8, 256, 10, torch.uint8, True),  # the headline M = 8 uint8: 8-byte loads
    (2, 2600, 8, 1000, 300, torch.int16, True),  # int16 16-byte loads, k > one tile
    (2, 700, 5, 300, 700, torch.int32, False),  # k == N
    (1, 5000, 4, 16, 1024, torch.int32, True),  # the largest k (2048-key buffers)
])
def test_emulated_pq_topk_kernel_matches_reference(emulated, batch, n, m, num_codes, k, dtype, integer):
    S, codes = random_problem(batch, n, m, num_codes, seed=n, integer_scores=integer, dtype=dtype)
    exclude = torch.randint(-1, n, (batch, 30), generator=torch.Generator().manual_seed(k))
    p = two_ctas(cuda.plan(batch, n, m, num_codes, FEW_SMS, k))
    status, cand = emulated.topk_candidates(S, codes, k, exclude, p)
    assert status == 0
    values, indices = cuda.merge_candidates(cand, k)
    ref_values, ref_indices = reference.pq_topk(S, codes, k, exclude)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_emulated_pq_topk_kernel_with_idle_ctas(emulated):
    S, codes = random_problem(2, 300, 2, 16, seed=5, integer_scores=True)
    p = dataclasses.replace(cuda.plan(2, 300, 2, 16, FEW_SMS, 20), grid_x=4)  # 2 tiles, 4 CTAs
    status, cand = emulated.topk_candidates(S, codes, 20, None, p)
    assert status == 0 and (cand[:, 2:] == EMPTY_KEY).all()
    values, indices = cuda.merge_candidates(cand, 20)
    ref_values, ref_indices = reference.pq_topk(S, codes, 20)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), n=st.integers(1, 2000), m=st.integers(1, 9), k=st.integers(1, 600),
       excluded=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_emulated_pq_topk_kernel_fuzz(emulated, batch, n, m, k, excluded, seed):
    k = min(k, n)
    S, codes = random_problem(batch, n, m, 16, seed=seed, integer_scores=seed % 2 == 0)
    exclude = torch.randint(-1, n, (batch, excluded), generator=torch.Generator().manual_seed(seed))
    status, cand = emulated.topk_candidates(S, codes, k, exclude, two_ctas(cuda.plan(batch, n, m, 16, FEW_SMS, k)))
    assert status == 0
    values, indices = cuda.merge_candidates(cand, k)
    ref_values, ref_indices = reference.pq_topk(S, codes, k, exclude)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


WARP = 32


@pytest.mark.parametrize("pattern", ["all", "none", "even_lanes", "last_lane", "random"])
def test_emulated_warp_append_gives_each_warp_one_block_in_lane_order(emulated, pattern):
    """One atomicAdd per warp: a warp's passing keys land contiguously, in lane order, and the
    blocks of all warps and rounds tile [0, count) without gaps or overlaps."""
    rounds = 3
    lanes = torch.arange(rounds * cuda.THREADS) % WARP
    passing = {"all": torch.ones_like(lanes, dtype=torch.bool), "none": torch.zeros_like(lanes, dtype=torch.bool),
               "even_lanes": lanes % 2 == 0, "last_lane": lanes == WARP - 1,
               "random": torch.rand(lanes.shape, generator=torch.Generator().manual_seed(1)) < 0.3}[pattern]
    keys = torch.randperm(rounds * cuda.THREADS, generator=torch.Generator().manual_seed(2)) + 7
    count, out = emulated.warp_append(keys.view(rounds, -1), passing.view(rounds, -1))
    assert count == int(passing.sum()) and (out[count:] == EMPTY_KEY).all()
    slot = {key: j for j, key in enumerate(out[:count].tolist())}
    assert len(slot) == count
    for warp_keys, warp_passing in zip(keys.view(-1, WARP), passing.view(-1, WARP)):
        written = torch.tensor([slot[key] for key in warp_keys[warp_passing].tolist()], dtype=torch.int64)
        assert torch.equal(written - written[:1], torch.arange(len(written)))  # consecutive slots, lane order


def _emulated_equals_reference(emulated, S, codes, k, exclude=None, grid_x=2):
    p = dataclasses.replace(cuda.plan(S.shape[0], codes.shape[0], S.shape[1], S.shape[2], FEW_SMS, k),
                            grid_x=grid_x)
    status, cand = emulated.topk_candidates(S, codes, k, exclude, p)
    assert status == 0
    values, indices = cuda.merge_candidates(cand, k)
    ref_values, ref_indices = reference.pq_topk(S, codes, k, exclude)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@pytest.mark.parametrize("n,k,tie_run", [
    (800, 100, 1),  # each tile beats all earlier ones: all 32 lanes of every warp pass
    (1100, 300, 40),  # runs of 40 equal scores straddle warps and tiles: ties across lanes
    (1037, 1024, 1),  # k = 1024, N = 4 tiles + a partial warp
])
def test_emulated_pq_topk_kernel_when_whole_warps_pass(emulated, n, k, tie_run):
    """Scores rising with the item index: in the first CTA each tile beats all kept keys, so whole
    warps insert at once and a buffer fills to exactly its length before it shrinks (the
    no-overflow bound is tight). The other queries of the group (QB = 4): falling scores (only the
    first tiles pass), a sawtooth, all tied."""
    rising = (torch.arange(n) // tie_run).float()
    S = torch.stack([rising, -rising, rising % 7, torch.zeros(n)]).view(4, 1, n)
    codes = torch.arange(n, dtype=torch.int32).view(n, 1)  # item i scores S[b, 0, i]
    _emulated_equals_reference(emulated, S, codes, k)


@pytest.mark.parametrize("n,k", [(5, 5), (31, 3), (33, 33), (557, 300), (300, 1)])
def test_emulated_pq_topk_kernel_partial_warps_and_ties(emulated, n, k):
    """N not a multiple of 32: the lanes past N vote 'no'; S of zeros ties every item."""
    S, codes = random_problem(3, n, 3, 16, seed=n, integer_scores=True)
    S[1] = 0.0  # all N items tie: the answer is items 0..k-1
    _emulated_equals_reference(emulated, S, codes, k)


def test_emulated_pq_topk_kernel_exclusions_of_whole_warps(emulated):
    n = 600
    S, codes = random_problem(3, n, 2, 4, seed=11, integer_scores=True)  # 4 codes, 2 splits: heavy ties
    exclude = torch.full((3, n), -1)
    exclude[0, :96] = torch.arange(96)  # three whole warps excluded, the rest tie as usual
    exclude[1, :n - 10] = torch.arange(10, n)  # only 10 items left for k = 50: a (-inf, -1) tail
    exclude[2, :n] = torch.arange(n)  # nothing left
    _emulated_equals_reference(emulated, S, codes, 50, exclude)
    _emulated_equals_reference(emulated, S, codes, n, exclude, grid_x=3)  # k = N


def test_code_loads_are_as_wide_as_rows_and_alignment_allow(emulated):
    """M = 8 uint8 codes (the headline shape) load 8 bytes at once, not one code at a time."""
    codes = torch.zeros(64, 16, dtype=torch.uint8)  # 64-byte aligned
    assert emulated.codes_vector_bytes(codes) == 16
    assert emulated.codes_vector_bytes(codes, offset_bytes=8) == 8
    assert emulated.codes_vector_bytes(codes[:, :8].contiguous()) == 8
    assert emulated.codes_vector_bytes(codes[:, :3].contiguous()) == 0
    assert emulated.codes_vector_bytes(torch.zeros(4, 4, dtype=torch.int16)) == 8
    assert emulated.codes_vector_bytes(torch.zeros(4, 4, dtype=torch.int32)) == 16


@pytest.mark.parametrize("batch,n,m,num_codes,dtype", [
    (1, 1, 1, 4, torch.uint8), (5, 1100, 16, 256, torch.uint8), (3, 700, 7, 300, torch.int16),
    (2, 900, 8, 256, torch.uint8),
    (2, 600, 4, 5000, torch.int32),
])
def test_emulated_pq_scores_kernel_matches_reference(emulated, batch, n, m, num_codes, dtype):
    S, codes = random_problem(batch, n, m, num_codes, seed=3, dtype=dtype)
    status, out = emulated.scores(S, codes, cuda.plan(batch, n, m, num_codes, FEW_SMS))
    assert status == 0
    assert torch.equal(out, reference.pq_scores(S, codes))  # same float32 summation order


@pytest.mark.parametrize("change", [
    {"buffer_len": 384},  # not a power of two
    {"buffer_len": 256},  # no room for a tile after k keys
    {"code_bytes": 3},
    {"query_group": 3},
    {"k": 1025},
    {"k": 301},  # k > N
    {"grid_x": 0},
])
def test_launcher_checks_reject_bad_arguments(emulated, change):
    """The argument checks the real launchers share (pq_launch.h), run through the emulation."""
    S, codes = random_problem(2, 300, 8, 256)
    k = change.get("k", 10)
    p = cuda.Plan(change.get("query_group", 2), 512, change.get("grid_x", 1), 0)
    status, _ = emulated.topk_candidates(S, codes, k, None, p, buffer_len=change.get("buffer_len"),
                                         code_bytes=change.get("code_bytes"))
    assert status == 1


# --------------------------------------------------------------------------------------------
# The per-shape dispatch table.

def test_dispatch_picks_fastest_available_at_nearest_shape():
    entries = [
        {"op": "pq_topk", "B": 1, "N": 10**7, "M": 32, "k": 10, "ms": {"cuda": 1.0, "triton": 2.0}},
        {"op": "pq_topk", "B": 1024, "N": 10**7, "M": 32, "k": 10, "ms": {"cuda": 9.0, "triton": 4.0}},
    ]
    near_small = {"B": 8, "N": 10**6, "M": 32, "k": 10}
    assert _gpu_dispatch.preferred("pq_topk", near_small, ["cuda", "triton"], entries) == "cuda"
    assert _gpu_dispatch.preferred("pq_topk", {"B": 512, "N": 10**6, "M": 32, "k": 100},
                                   ["cuda", "triton"], entries) == "triton"
    assert _gpu_dispatch.preferred("pq_topk", near_small, ["triton"], entries) == "triton"
    assert _gpu_dispatch.preferred("pq_scores", near_small, ["cuda", "triton"], entries) is None


def test_dispatch_order_drops_shapes_the_cuda_backend_cannot_run(monkeypatch):
    monkeypatch.setattr(cuda, "device_limits", lambda device: H100)
    monkeypatch.setattr(_gpu_dispatch, "measured_entries", lambda: ())
    device = torch.device("cuda")
    small = {"B": 4, "N": 10**6, "M": 32, "K": 256, "k": 100}
    assert _gpu_dispatch.order("pq_topk", small, device, ["cuda", "triton", "reference"]) == [
        "cuda", "triton", "reference"]
    big_k = dict(small, k=2000)
    assert "k must be <= 1024" in cuda.shape_unsupported("pq_topk", big_k, device)
    assert _gpu_dispatch.order("pq_topk", big_k, device, ["cuda", "triton", "reference"]) == ["triton", "reference"]
    wide = {"B": 4, "N": 10**6, "M": 64, "K": 1024}
    assert _gpu_dispatch.order("pq_scores", wide, device, ["cuda", "reference"]) == ["reference"]


def test_shipped_dispatch_table_is_well_formed():
    for entry in _gpu_dispatch.measured_entries():
        assert entry["op"] in ("pq_topk", "pq_scores") and entry["ms"]
        assert set(entry["ms"]) <= {"cuda", "triton"}


# --------------------------------------------------------------------------------------------
# The kernels, on a GPU.

def _cuda_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    return cuda.unavailable_reason(torch.device("cuda"))


gpu = pytest.mark.skipif(_cuda_reason() is not None, reason=f"cuda backend unavailable: {_cuda_reason()}")


def _on_gpu(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@gpu
@pytest.mark.parametrize("batch,n,m,num_codes,k,dtype", [
    (1, 1, 1, 4, 1, torch.uint8),
    (3, 1000, 3, 256, 7, torch.uint8),  # M odd: scalar code loads
    (5, 4099, 16, 256, 100, torch.uint8),  # 16-byte code loads, QB=4 with a partial group
    (2, 3000, 32, 256, 1024, torch.uint8),  # the largest k
    (4, 777, 8, 256, 777, torch.uint8),  # k == N
    (2, 2500, 8, 1000, 50, torch.int16),  # 16-byte loads of int16
    (2, 2500, 5, 300, 50, torch.int32),
])
@pytest.mark.parametrize("integer", [True, False])
def test_pq_topk_matches_reference(batch, n, m, num_codes, k, dtype, integer):
    S, codes = random_problem(batch, n, m, num_codes, seed=n, integer_scores=integer, dtype=dtype)
    values, indices = ops.pq_topk(*_on_gpu(S, codes), k, backend="cuda")
    ref_values, ref_indices = reference.pq_topk(S, codes, k)
    # the kernel adds splits in the reference's order, so even random floats agree bit for bit
    assert torch.equal(values.cpu(), ref_values) and torch.equal(indices.cpu(), ref_indices)


@gpu
def test_pq_topk_exclusions_and_short_tails():
    S, codes = random_problem(3, 600, 4, 16, seed=1, integer_scores=True)
    exclude = torch.tensor([list(range(0, 600, 2)) + [-1] * 300, [-1] * 600, list(range(600))])
    values, indices = ops.pq_topk(*_on_gpu(S, codes), 400, exclude=exclude.cuda(), backend="cuda")
    assert_topk(S, codes, 400, values.cpu(), indices.cpu(), exclude=exclude, exact=True)
    assert (indices[2] == -1).all() and (indices[0, 300:] == -1).all()


@gpu
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 9), n=st.integers(1, 3000), m=st.integers(1, 33), k=st.integers(1, 1024),
       num_codes=st.sampled_from([2, 16, 256]), excluded=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_pq_topk_fuzz(batch, n, m, k, num_codes, excluded, seed):
    k = min(k, n)
    S, codes = random_problem(batch, n, m, num_codes, seed=seed, integer_scores=seed % 2 == 0)
    exclude = torch.randint(-1, n, (batch, excluded), generator=torch.Generator().manual_seed(seed))
    S_gpu, codes_gpu, exclude_gpu = _on_gpu(S, codes, exclude)
    values, indices = ops.pq_topk(S_gpu, codes_gpu, k, exclude=exclude_gpu, backend="cuda")
    ref_values, ref_indices = reference.pq_topk(S, codes, k, exclude)
    assert torch.equal(values.cpu(), ref_values) and torch.equal(indices.cpu(), ref_indices)


@gpu
@pytest.mark.parametrize("batch,n,m,num_codes,dtype", [
    (1, 1, 1, 4, torch.uint8), (5, 4099, 16, 256, torch.uint8), (3, 1001, 7, 300, torch.int16),
    (2, 999, 4, 5000, torch.int32),
])
def test_pq_scores_matches_reference(batch, n, m, num_codes, dtype):
    S, codes = random_problem(batch, n, m, num_codes, seed=3, dtype=dtype)
    got = ops.pq_scores(*_on_gpu(S, codes), backend="cuda")
    assert torch.equal(got.cpu(), reference.pq_scores(S, codes))


@gpu
def test_pq_topk_full_scale():
    S, codes = random_problem(16, 10**6, 32, 256, seed=7)
    S, codes = _on_gpu(S, codes)
    for k in (10, 100, 1024):
        values, indices = ops.pq_topk(S, codes, k, backend="cuda")
        ref_values, ref_indices = ops.pq_topk(S, codes, k, backend="reference")
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@gpu
def test_launcher_rejects_bad_plans():
    S, codes = _on_gpu(*random_problem(2, 1000, 8, 256))
    with pytest.raises(RuntimeError, match="pq_topk_candidates failed"):  # buffer too short for k + a tile
        torch.ops.recjpq_cuda.pq_topk_candidates(S, codes, None, 10, 256, 1, 4)
    with pytest.raises(RuntimeError, match="pq_scores failed"):  # query group must be 1, 2 or 4
        torch.ops.recjpq_cuda.pq_scores(S, codes, 3, 4)
