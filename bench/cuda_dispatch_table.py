"""Measure the "cuda" and "triton" backends on one GPU and write the per-shape dispatch table.

For each shape (op, B, N, M, k) it times every available GPU backend of ``pq_topk`` and
``pq_scores`` on the same S and codes (median of CUDA-event timings after a warm-up), then writes
``recjpq/backends/gpu_dispatch.json`` (read by ``recjpq.backends.resolve`` when ``backend=None``)
and a copy with the machine described under ``${OUT:-bench/results}``.

    python bench/cuda_dispatch_table.py [--quick] [--budget-s 240] [--from-gpu-bench JSON ...]

``--from-gpu-bench`` adds the pq_topk shapes that bench/gpu_bench.py timed (its recjpq:cuda and
recjpq:triton columns; both include building S from the queries, so their order is the kernels')
to the table, with or without new measurements (``--budget-s 0`` measures none).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recjpq  # noqa: E402
from bench.peers import machine  # noqa: E402
from recjpq import ops  # noqa: E402
from recjpq.backends import _gpu_dispatch  # noqa: E402

FULL = {"n": [1_000_000, 10_000_000], "m": [8, 32], "b": [1, 4, 16, 64, 256, 1024], "k": [10, 100, 1000]}
QUICK = {"n": [1_000_000, 10_000_000], "m": [32], "b": [1, 16, 256], "k": [10, 100]}
NUM_CODES = 256
GPU_BACKENDS = ("cuda", "triton")


def time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(grid: dict, budget_s: float) -> list[dict]:
    backends = [b for b in GPU_BACKENDS if b in recjpq.available_backends("cuda")]
    print("timing backends:", backends)
    entries, started = [], time.monotonic()
    for n in grid["n"]:
        for m in grid["m"]:
            codes = torch.randint(0, NUM_CODES, (n, m), device="cuda", dtype=torch.int32).to(torch.uint8)
            for batch in grid["b"]:
                S = torch.randn(batch, m, NUM_CODES, device="cuda")
                jobs = [("pq_topk", k) for k in grid["k"]] + ([("pq_scores", None)] if batch * n <= 1 << 31 else [])
                for op, k in jobs:
                    if time.monotonic() - started > budget_s:
                        print(f"budget of {budget_s} s spent: stopping")
                        return entries
                    entry = {"op": op, "B": batch, "N": n, "M": m, "ms": {}}
                    if k is not None:
                        entry["k"] = k
                    for name in backends:
                        call = ((lambda: ops.pq_topk(S, codes, k, backend=name)) if op == "pq_topk"
                                else (lambda: ops.pq_scores(S, codes, backend=name)))
                        try:
                            entry["ms"][name] = round(time_ms(call), 4)
                        except Exception as e:  # one backend failing a shape must not lose the rest
                            print(f"{op} B={batch} N={n} M={m} k={k} {name}: {type(e).__name__}: {e}")
                        torch.cuda.empty_cache()
                    print(json.dumps(entry))
                    if entry["ms"]:
                        entries.append(entry)
    return entries


def entries_from_gpu_bench(report: dict, source: str) -> list[dict]:
    """pq_topk entries from a bench/gpu_bench.py report: each shape where both GPU backends were timed."""
    entries = []
    for row in report["results"]:
        ms = {name: round(row.get("ms", {})[f"recjpq:{name}"], 4) for name in GPU_BACKENDS
              if f"recjpq:{name}" in row.get("ms", {})}
        if len(ms) == len(GPU_BACKENDS):
            entries.append({"op": "pq_topk", "B": row["batch"], "N": row["n"], "M": row["m"], "k": row["k"], "ms": ms,
                            "source": source})
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new shape after this many seconds")
    parser.add_argument("--table", default=_gpu_dispatch.TABLE_PATH, help="where the dispatch table goes")
    parser.add_argument("--from-gpu-bench", nargs="+", default=[], metavar="JSON",
                        help="also take the pq_topk shapes of these bench/gpu_bench.py reports")
    parser.add_argument("--from-table", nargs="+", default=[], metavar="JSON",
                        help="also keep the entries of these earlier tables (same device)")
    args = parser.parse_args()
    entries, device, described = [], None, None
    for path in args.from_table:
        with open(path) as f:
            earlier = json.load(f)
        entries += earlier["entries"]
        device, described = earlier["device"], earlier["machine"]
    for path in args.from_gpu_bench:
        with open(path) as f:
            report = json.load(f)
        entries += entries_from_gpu_bench(report, os.path.basename(path))
        described = report["machine"]
        device = described.get("gpu", device)
    if args.budget_s > 0:
        if not torch.cuda.is_available():
            sys.exit("cuda_dispatch_table.py needs a CUDA device to measure (or --budget-s 0 with --from-*)")
        entries += measure(QUICK if args.quick else FULL, args.budget_s)
        device, described = torch.cuda.get_device_name(), machine()
    # one entry per shape, the last source's: merging a table with a report it already holds adds nothing
    entries = list({(e["op"], e["B"], e["N"], e["M"], e.get("k")): e for e in entries}.values())
    table = {"device": device, "machine": described,
             "note": "written by bench/cuda_dispatch_table.py; ms = median CUDA-event time per call",
             "entries": entries}
    with open(args.table, "w") as f:
        json.dump(table, f, indent=1)
    out = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cuda_dispatch_table.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.table} ({len(entries)} shapes)")


if __name__ == "__main__":
    main()
