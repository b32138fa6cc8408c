"""B = 1 latency on an idle and on a busy machine: recjpq's default path against FAISS IndexPQ.

    python bench/busy_latency.py                 # Gowalla shape, 200 calls per method and load
    python bench/busy_latency.py --calls 40 --n 100000   # a quick check of the script

One query per call at N = 1,271,638, M = 8, d = 512, K = 256, k = 10 (random codes, centroids and
queries): ``ops.pq_topk_query`` on the default path (torch's thread count), the same pinned to one
thread, and FAISS ``IndexPQ.search`` over the very same codes and centroids (``bench/peers.py``).
Each load condition (idle, then 1 and 2 busy processes, ``python -c "while True: pass"`` started
and stopped here) times every method in interleaved rounds, so all of them see the same load; the
load average and the busy processes' CPU share are recorded beside p50 / p99. Compare ratios
within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import Catalogue, faiss_index_pq, faiss_topk, machine  # noqa: E402
from recjpq import ops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROUND = 20  # calls per method before switching to the next one


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (/proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(methods: dict, calls: int) -> dict:
    """Per method: ``calls`` latencies (ms) taken in interleaved rounds of ROUND calls."""
    times = {name: [] for name in methods}
    while any(len(t) < calls for t in times.values()):
        for name, fn in methods.items():
            for _ in range(min(ROUND, calls - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def percentiles(samples: list[float]) -> dict:
    t = torch.tensor(samples, dtype=torch.float64)
    return {"p50_ms": round(t.quantile(0.5).item(), 4), "p99_ms": round(t.quantile(0.99).item(), 4),
            "min_ms": round(t.min().item(), 4), "calls": len(samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_271_638)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy processes per condition")
    parser.add_argument("--label", default="", help="stored with the results (e.g. which build ran)")
    parser.add_argument("--out", type=Path, default=RESULTS / "busy_latency.json")
    args = parser.parse_args()

    cat = Catalogue(args.n, args.m, args.d, 16, seed=0)
    index = faiss_index_pq(cat)
    queries = [cat.queries[i:i + 1].contiguous() for i in range(cat.queries.shape[0])]
    threads = torch.get_num_threads()
    step = [0]

    def query():
        step[0] += 1
        return queries[step[0] % len(queries)]

    def one_thread():
        torch.set_num_threads(1)
        try:
            return ops.pq_topk_query(query(), cat.centroids, cat.codes, args.k)
        finally:
            torch.set_num_threads(threads)

    methods = {
        f"recjpq default ({threads} threads)": lambda: ops.pq_topk_query(query(), cat.centroids, cat.codes, args.k),
        "recjpq 1 thread": one_thread,
        "faiss IndexPQ": lambda: faiss_topk(index, query(), args.k),
    }
    # same answers (FAISS sums in another order: compare the ids), and warm caches and layouts
    for q in queries[:4]:
        ours = ops.pq_topk_query(q, cat.centroids, cat.codes, args.k)[1]
        ref = ops.pq_topk_query(q, cat.centroids, cat.codes, args.k, backend="reference")[1]
        assert torch.equal(ours, ref), "default path differs from the reference"
    measure(methods, ROUND)

    conditions = []
    for busy in args.busy:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)  # let the scheduler settle the spinners in
            load_before, cpu_before, t0 = os.getloadavg()[0], _cpu_seconds([p.pid for p in procs]), time.time()
            times = measure(methods, args.calls)
            wall = time.time() - t0
            busy_share = (_cpu_seconds([p.pid for p in procs]) - cpu_before) / wall if procs else 0.0
        finally:
            for p in procs:
                p.kill()
                p.wait()
        row = {"busy_processes": busy, "loadavg_1min_before": round(load_before, 2),
               "loadavg_1min_after": round(os.getloadavg()[0], 2),
               "busy_processes_cpu_cores": round(busy_share, 2), "seconds": round(wall, 1),
               "methods": {name: percentiles(t) for name, t in times.items()}}
        default, faiss = row["methods"][next(iter(methods))], row["methods"]["faiss IndexPQ"]
        row["faiss_over_default_p50"] = round(faiss["p50_ms"] / default["p50_ms"], 2)
        row["faiss_over_default_p99"] = round(faiss["p99_ms"] / default["p99_ms"], 2)
        print(json.dumps(row), flush=True)
        conditions.append(row)

    result = {"label": args.label, "shape": {"N": args.n, "M": args.m, "d": args.d, "K": 256, "k": args.k, "B": 1},
              "machine": machine(), "conditions": conditions}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
