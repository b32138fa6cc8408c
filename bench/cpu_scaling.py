"""The "cpu" backend's scaling table, peak memory and pruning speed-up, peers measured beside it.

    python bench/cpu_scaling.py            # everything (< 10 min on 2 cores), JSON in bench/results/
    python bench/cpu_scaling.py --quick    # a small grid, to check the script

1. scaling: N in {1e5, 1e6, 1e7} x M in {8, 32} x B in {1, 16, 256}, K=256, d=512, k=10: the
   exhaustive kernel, FAISS IndexPQ and the torch split loop (a peer is skipped, and marked so,
   where it would hold more than ~4 GB of scores or take longer than about a minute).
2. peak RSS of N=1e7, B=256 top-10 in a fresh subprocess, against the 10 GB a score matrix takes.
3. prune vs exhaustive at Gowalla size on S tables of growing peakedness: queries
   q = alpha * (an item's own embedding) + noise, alpha = 0 being random S.
Times: best of a few runs after a warm-up (which also builds the cached code layouts);
compare ratios within one run only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import Catalogue, faiss_index_pq, faiss_topk, machine, split_loop_topk  # noqa: E402
from recjpq import ops  # noqa: E402
from recjpq.backends import cpu  # noqa: E402

RESULTS = Path(__file__).parent / "results"
K_TOP, D = 10, 512
MAX_SCORE_BYTES = 4e9  # the split loop holds B x N float32 scores
MAX_SECONDS = 60.0     # a peer's estimated time for warm-up + repeats beyond which it is skipped


def timed(fn, repeat: int) -> float:
    """Best ms of ``repeat`` runs after one warm-up (one run only when the warm-up is slow). The best,
    not the median: on a shared 2-core machine other jobs only ever add time."""
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    if warm > 2.0:
        repeat = 1
    elif warm < 0.05:
        repeat *= 4  # short calls are the ones a descheduled thread inflates most
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def recjpq_fn(cat, q, algorithm="exhaustive"):
    return lambda: ops.pq_topk(ops.subitem_scores(q, cat.centroids), cat.codes, K_TOP, backend="cpu",
                               algorithm=algorithm)


def scaling(ns, ms, batches, repeat):
    rows = []
    for n in ns:
        for m in ms:
            cat = Catalogue(n, m, D, max(batches), seed=1)
            index = faiss_index_pq(cat)
            per_query = {}  # method -> ms per query at the last batch, to predict the next one
            for batch in batches:
                q = cat.queries[:batch].contiguous()
                row = {"n": n, "m": m, "batch": batch}
                row["recjpq_cpu_ms"] = timed(recjpq_fn(cat, q), repeat)
                for name, fn, fits in (
                        ("faiss", lambda: faiss_topk(index, q, K_TOP), True),
                        ("split_loop", lambda: split_loop_topk(cat, q, K_TOP), batch * n * 4 <= MAX_SCORE_BYTES)):
                    guess = per_query.get(name, 0.0) * batch * (repeat + 1) / 1e3
                    if not fits or guess > MAX_SECONDS:
                        row[f"{name}_ms"] = None
                        row[f"{name}_skipped"] = "too much memory" if not fits else f"~{guess:.0f} s estimated"
                        continue
                    row[f"{name}_ms"] = timed(fn, repeat)
                    per_query[name] = row[f"{name}_ms"] / batch
                for name in ("faiss", "split_loop"):
                    if row[f"{name}_ms"] is not None:
                        row[f"{name}_x"] = row[f"{name}_ms"] / row["recjpq_cpu_ms"]
                print(json.dumps(row), flush=True)
                rows.append(row)
            del cat, index
    return rows


_RSS_CHILD = """
import resource, time, numpy, torch
from recjpq import ops
n, m, batch = {n}, {m}, {batch}
rng = numpy.random.default_rng(0)
codes = torch.from_numpy(rng.integers(0, 256, (n, m), dtype=numpy.uint8))  # no int64 intermediate
S = torch.from_numpy(rng.standard_normal((batch, m, 256), dtype=numpy.float32))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
    f.write("5")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ops.pq_topk(S, codes, 10, backend="cpu", algorithm="exhaustive")
ms = (time.perf_counter() - t0) * 1e3
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, ms)
"""


def peak_rss(n, m, batch):
    """Peak RSS of one top-10 call (the first: it includes building the code layout) in a fresh
    process, from ru_maxrss (KiB on Linux) with the mark reset just before the call."""
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD.format(n=n, m=m, batch=batch)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    before, after, ms = out.split()
    row = {"n": n, "m": m, "batch": batch, "rss_before_topk_mb": int(before) / 1024,
           "peak_rss_mb": int(after) / 1024, "topk_ms_first_call": float(ms),
           "codes_mb": n * m / 2**20, "score_matrix_mb": batch * n * 4 / 2**20}
    print(json.dumps(row), flush=True)
    return row


def peaked_queries(cat, batch, alpha, seed=2):
    """Queries near real items (alpha = 1: an item's own embedding plus unit-variance noise per dim)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, cat.codes.shape[0], (batch,), generator=g)
    m = cat.codes.shape[1]
    own = cat.centroids[torch.arange(m), cat.codes[targets].long()].flatten(1)
    return (alpha * own + torch.randn(batch, own.shape[1], generator=g)).contiguous()


def pruning(n, m, batches, alphas, repeat):
    cat = Catalogue(n, m, D, 1, seed=3)
    rows = []
    for alpha in alphas:
        for batch in batches:
            q = peaked_queries(cat, batch, alpha)
            S = ops.subitem_scores(q, cat.centroids).contiguous()
            ref = ops.pq_topk(S, cat.codes, K_TOP, backend="reference")[1]
            row = {"n": n, "m": m, "batch": batch, "alpha": alpha}
            for algorithm in ("exhaustive", "prune", "auto"):
                row[f"{algorithm}_ms"] = timed(recjpq_fn(cat, q, algorithm), repeat)
                assert torch.equal(recjpq_fn(cat, q, algorithm)()[1], ref), (algorithm, alpha, batch)
            offsets, items, codes = cpu.prune_index(cpu.snapshot(cat.codes, S.shape[2]), S.shape[2])
            visited = torch.ops.recjpq_cpu.pq_topk_prune(S, codes, offsets, items, K_TOP, None, n)[2]
            row["prune_visited_fraction"] = visited.double().mean().item() / n
            row["prune_speedup"] = row["exhaustive_ms"] / row["prune_ms"]
            row["auto_speedup"] = row["exhaustive_ms"] / row["auto_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small grid: checks the script in seconds")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sections", nargs="+", default=["scaling", "peak_rss", "pruning"],
                   help="run only these, updating the others' entries in an existing JSON")
    args = p.parse_args(argv)
    if args.quick:
        grid = dict(ns=[20_000], ms=[8], batches=[1, 16])
        rss, prune = (20_000, 8, 16), dict(n=20_000, m=8, batches=[1], alphas=[0.0, 1.0])
    else:
        grid = dict(ns=[100_000, 1_000_000, 10_000_000], ms=[8, 32], batches=[1, 16, 256])
        rss, prune = (10_000_000, 8, 256), dict(n=1_271_638, m=8, batches=[1, 64], alphas=[0.0, 0.5, 1.0, 2.0, 4.0])
    started = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("cpu_scaling_quick.json" if args.quick else "cpu_scaling.json")
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"machine": machine(), "k": K_TOP, "d": D, "num_codes": 256, "repeat": args.repeat,
                   "simd": cpu.simd_level()})
    for section, run in (("scaling", lambda: scaling(**grid, repeat=args.repeat)),
                         ("peak_rss", lambda: peak_rss(*rss)),
                         ("pruning", lambda: pruning(**prune, repeat=args.repeat))):
        if section not in args.sections:
            continue
        result[section] = run()
        result[f"{section}_wall_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1))  # after each section: a late failure keeps the rest
    print(f"saved {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
