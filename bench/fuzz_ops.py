"""Fuzz the cpu backend's ops against the reference backend (the oracle), bit for bit.

    python bench/fuzz_ops.py                    # 10,000 cases, summary JSON in bench/results/
    python bench/fuzz_ops.py --examples 500     # a shorter run

Each hypothesis case draws an op (``pq_topk`` with every algorithm, ``pq_scores``,
``pq_topk_query`` on the cpu backend, and with ``backend=None`` as ``"auto"`` and ``"matmul"``,
which take the one-call path and the decoded table), the shape (B, N, M, K, k), the codes dtype, views and non-contiguous inputs
(strided rows, a column slice of a wider tensor, transposed storage), exclusions (with -1 padding,
duplicates, out-of-result ids), tied integer scores, the thread count (1 or 2) and the SIMD path,
and demands the reference backend's exact values and indices. ``tests/test_cpu_backend.py`` runs a
few hundred of the same cases.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recjpq import ops  # noqa: E402
from recjpq.backends import cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OPS = ("topk_exhaustive", "topk_prune", "topk_auto", "scores", "topk_query", "topk_query_auto", "topk_query_matmul")
VIEWS = ("contiguous", "row_step", "column_slice", "transposed")
SIMD_PATHS = tuple(level for level in ("scalar", "avx2", "avx512") if cpu.simd_supported(level))


def _view(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` again (same values) as the kind of tensor ``how`` names; all but "contiguous" are views
    of a larger or differently laid out storage."""
    if how == "row_step":  # every other row of a tensor twice as long
        wide = torch.empty((2 * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype)
        wide[::2] = x
        return wide[::2]
    if how == "column_slice":  # the middle columns of a wider last dimension
        wide = torch.zeros(tuple(x.shape[:-1]) + (x.shape[-1] + 3,), dtype=x.dtype)
        wide[..., 1:-2] = x
        return wide[..., 1:-2]
    if how == "transposed":  # the last two dims stored the other way round
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


@st.composite
def cases(draw):
    """One fuzz case: everything ``check_case`` needs, as plain values (hypothesis shrinks them)."""
    op = draw(st.sampled_from(OPS))
    batch = draw(st.integers(1, 5))
    n = draw(st.one_of(st.integers(1, 300), st.integers(1, 5000)))
    m = draw(st.integers(1, 9))
    num_codes = draw(st.integers(1, 300))
    dtypes = [torch.int16, torch.int32] + ([torch.uint8] if num_codes <= 256 else [])
    return {
        "op": op, "batch": batch, "n": n, "m": m, "num_codes": num_codes,
        "dtype": draw(st.sampled_from(dtypes)),
        "k": draw(st.integers(1, n)),
        "exclude_width": draw(st.sampled_from([0, 0, 1, 3, 8])),
        "integer_scores": draw(st.booleans()),
        "codes_view": draw(st.sampled_from(VIEWS)),
        "table_view": draw(st.sampled_from(VIEWS)),
        "threads": draw(st.sampled_from([1, 2])),
        "simd": draw(st.sampled_from(SIMD_PATHS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_case(case: dict) -> None:
    """Runs the case on the cpu and reference backends; raises AssertionError on any difference."""
    g = torch.Generator().manual_seed(case["seed"])
    batch, n, m, num_codes, k = case["batch"], case["n"], case["m"], case["num_codes"], case["k"]
    codes = _view(torch.randint(0, num_codes, (n, m), generator=g).to(case["dtype"]), case["codes_view"])
    exclude = None
    if case["exclude_width"]:
        exclude = torch.randint(-1, n, (batch, case["exclude_width"]), generator=g)
        exclude[:, -1] = exclude[:, 0]  # a duplicate id in every row
    threads = torch.get_num_threads()
    torch.set_num_threads(case["threads"])
    try:
        with mock.patch.dict(os.environ, {cpu.SIMD_ENV: case["simd"]}):
            if case["op"].startswith("topk_query"):
                dsub = int(torch.randint(1, 11, (1,), generator=g))  # both sides of the C++ table's 8
                query = _view(_values((batch, m * dsub), g, case["integer_scores"]), case["table_view"])
                centroids = _view(_values((m, num_codes, dsub), g, case["integer_scores"]), case["table_view"])
                how = {"topk_query": {"backend": "cpu"}, "topk_query_auto": {},
                       "topk_query_matmul": {"algorithm": "matmul"}}[case["op"]]
                got = ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, **how)
                want = ops.pq_topk_query(query, centroids, codes, k, exclude=exclude, backend="reference")
            else:
                S = _view(_values((batch, m, num_codes), g, case["integer_scores"]), case["table_view"])
                if case["op"] == "scores":
                    got = (ops.pq_scores(S, codes, backend="cpu"),)
                    want = (ops.pq_scores(S, codes, backend="reference"),)
                else:
                    algorithm = case["op"][len("topk_"):]
                    got = ops.pq_topk(S, codes, k, exclude=exclude, backend="cpu", algorithm=algorithm)
                    want = ops.pq_topk(S, codes, k, exclude=exclude, backend="reference")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"{case}: cpu {a} != reference {b}"


def _values(shape, g, integer: bool) -> torch.Tensor:
    """Normal floats, or small integers (exact sums, many ties: only the lower-index rule orders them)."""
    return torch.randint(-3, 4, shape, generator=g).float() if integer else torch.randn(shape, generator=g)


def run(examples: int, seed: int) -> dict:
    """Runs ``examples`` cases; returns the counts by op, dtype, view, threads and SIMD path."""
    seen = Counter()

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(case=cases())
    def fuzz(case):
        check_case(case)
        seen["cases"] += 1
        for key in ("op", "codes_view", "table_view", "threads", "simd"):
            seen[f"{key}={case[key]}"] += 1
        seen[f"dtype={str(case['dtype']).replace('torch.', '')}"] += 1
        seen["with_exclude"] += bool(case["exclude_width"])
        seen["integer_scores"] += case["integer_scores"]

    fuzz()
    return dict(sorted(seen.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_ops.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    counts = run(args.examples, args.seed)
    summary = {"examples_requested": args.examples, "seed": args.seed, "result": "all matched the reference",
               "seconds": round(time.perf_counter() - t0, 1), "simd_paths": list(SIMD_PATHS), "counts": counts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
