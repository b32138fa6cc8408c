"""Codes that change under an op never crash the cpu kernels (issue 21, crashes A, B and C).

The kernels read one private snapshot of the codes, range-checked on the copy itself. The race
reproducers run in a subprocess (``bench/codes_race.py``, which runs them for 30 s each), so a
crash fails a test instead of killing pytest. Against the build before the snapshot, the A test
crashed in 11 of 12 runs, B and C in 6 of 6.
"""
from __future__ import annotations

import pytest
import torch

from bench import codes_race
from recjpq import backends, ops

if backends._reason("cpu", "cpu") is not None:
    pytest.skip(f"cpu backend unavailable: {backends._reason('cpu', 'cpu')}", allow_module_level=True)

from recjpq.backends import cpu  # noqa: E402


@pytest.mark.parametrize("case,seconds,op_names", [
    ("A", 4.0, ["topk_prune"]),   # valid codes rewritten during the calls: the inverted index raced
    ("B", 2.0, list(codes_race.OPS)),  # out-of-range int32 codes written during the calls
    ("C", 0.0, list(codes_race.OPS)),  # hidden (.data / numpy) writes between calls: one pass over every op
])
def test_codes_changing_under_the_ops_never_crash(case, seconds, op_names):
    result = codes_race.run_case(case, codes_race.available_simd_paths(), op_names, seconds)
    assert result["rc"] == 0, result
    assert result["calls"] > result["safe_errors"] >= 0  # some calls ran to the end, not only range errors


def test_snapshot_range_is_that_of_the_copy():
    codes = torch.randint(5, 9, (130, 3), dtype=torch.int16)
    blocked, lo, hi = torch.ops.recjpq_cpu.block_codes(codes)
    assert (lo, hi) == (int(codes.min()), int(codes.max()))  # the zero padding of the last block is not counted
    assert torch.equal(blocked.transpose(1, 2).reshape(-1, 3)[:130], codes)
    assert blocked.transpose(1, 2).reshape(-1, 3)[130:].eq(0).all()


@pytest.mark.parametrize("algorithm", ["exhaustive", "prune"])
def test_hidden_write_is_stale_until_the_version_moves(algorithm):
    S = torch.randn(2, 4, 16)
    codes = torch.randint(0, 16, (300, 4), dtype=torch.int32)
    before = ops.pq_topk(S, codes, 5, backend="cpu", algorithm=algorithm)
    codes.numpy()[:, 2] = 2**31 - 1  # bypasses the version counter: the snapshot cannot see it
    after = ops.pq_topk(S, codes, 5, backend="cpu", algorithm=algorithm)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    torch.autograd.graph.increment_version(codes)  # the documented way to say the codes changed
    with pytest.raises(ValueError, match="codes must lie in"):
        ops.pq_topk(S, codes, 5, backend="cpu", algorithm=algorithm)


def test_kernels_read_the_snapshot_not_the_callers_codes():
    S = torch.randn(1, 2, 8)
    codes = torch.randint(0, 8, (100, 2), dtype=torch.uint8)
    info = cpu.snapshot(codes, 8)
    expected = torch.ops.recjpq_cpu.pq_scores(S, info.blocked, info.n, "auto")
    codes.data.fill_(7)  # a hidden write: the snapshot, and so every kernel, keeps the old codes
    assert cpu.snapshot(codes, 8) is info
    assert torch.equal(ops.pq_scores(S, codes, backend="cpu"), expected)
    offsets, items, rows = cpu.prune_index(info, 8)
    assert torch.equal(rows, info.blocked.transpose(1, 2).reshape(-1, 2)[:100])
