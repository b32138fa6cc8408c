"""Speed-up of recjpq's default ``pq_topk_query`` over the best peer, across catalogue shapes.

    python bench/shape_grid.py                # the default subset (see DEFAULT_CELLS), ~15 min on 2 cores
    python bench/shape_grid.py --full         # N x B x d x M x k as in issue 17 (hours)
    python bench/shape_grid.py --n 3417 --b 1 128 --d 64 --m 8 --k 10 --variants lut matmul

Peers, each from the same codes, centroids and queries, timed in the same rounds as recjpq
(interleaved: every round calls each method once, in a shuffled order): dense fp32 ``q @ W.T`` +
``torch.topk`` over the decoded table (decoded once, outside the timing), FAISS ``IndexPQ``
(exhaustive inner product on the same codes and centroids) and the PyTorch split loop. recjpq
and the split loop include building S. ``--variants`` adds recjpq with a forced algorithm
(``lut``, ``matmul``), which is how the ``"auto"`` crossovers were read. Times are the median CPU
time per call (``time.process_time``: with one thread, the work without the waits that other
jobs on a shared machine add), wall-clock medians beside them. Cells whose arrays would
not fit ``--mem-gb``, or whose predicted call (cost per unit of work measured on smaller cells)
exceeds ``--max-call`` seconds, skip that peer and say so; ``--budget`` seconds bound the run,
and cells not reached are listed as not run. Writes JSON (``--out``) and a heatmap (``--png``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.peers import Catalogue, dense_topk, faiss_index_pq, faiss_topk, machine, split_loop_topk
from recjpq import ops
from recjpq.ops import _decoded

FULL = {"n": [3417, 10_000, 100_000, 1_000_000, 10_000_000], "b": [1, 8, 64, 512], "d": [64, 128, 512],
        "m": [8, 16, 32], "k": [10, 100]}
# The default subset: the ML-1M SASRec shape (d = 64, M = 8) and a wide one (d = 512, M = 32) at
# every B and k up to N = 1e6, d = 128 / M = 16 at k = 10, and N = 1e7 at small B.
DEFAULT_CELLS = (
    [dict(n=n, b=b, d=64, m=8, k=k) for n in FULL["n"][:4] for b in FULL["b"] for k in FULL["k"]]
    + [dict(n=n, b=b, d=128, m=16, k=10) for n in FULL["n"][:4] for b in FULL["b"]]
    + [dict(n=n, b=b, d=512, m=32, k=k) for n in FULL["n"][:4] for b in FULL["b"] for k in FULL["k"]]
    + [dict(n=10_000_000, b=b, d=64, m=8, k=10) for b in (1, 8)]
)
PEERS = ("dense", "faiss", "split_loop")


def _work(method: str, c: dict) -> float:
    """What a method's time scales with: GEMM flops for dense, table lookups for the rest."""
    return c["b"] * c["n"] * (c["d"] if method in ("dense", "matmul") else c["m"])


def _bytes(method: str, c: dict) -> int:
    """Memory a method needs beyond the codes: the decoded table and B x N score rows."""
    table = c["n"] * c["d"] * 4
    if method == "dense":
        return table + 2 * c["b"] * c["n"] * 4
    if method == "split_loop":
        return c["n"] * c["m"] * 8 + 2 * c["b"] * c["n"] * 4
    if method in ("recjpq", "matmul"):
        path_matmul = method == "matmul" or _decoded.prefers_matmul(c["b"], c["n"], c["d"], c["m"], c["k"])
        return table + min(c["b"], 64) * c["n"] * 4 if path_matmul else 0
    return 0


class Grid:
    def __init__(self, args):
        self.args = args
        self.coef: dict[str, float] = {}  # method -> seconds per unit of work, from the cells run so far
        self.catalogue_key = None
        self.deadline = time.perf_counter() + args.budget

    def _prepare(self, c: dict, methods):
        key = (c["n"], c["m"], c["d"])
        if key != self.catalogue_key:
            self.catalogue_key = None
            self.cat = self.items = self.index = None  # free the previous catalogue first
            self.cat = Catalogue(c["n"], c["m"], c["d"], max(self.args.b_all))
            self.catalogue_key = key
        if "dense" in methods and self.items is None:
            self.items = self.cat.item_matrix()
        if "faiss" in methods and self.index is None:
            self.index = faiss_index_pq(self.cat)

    def _call(self, method: str, q: torch.Tensor, k: int):
        cat = self.cat
        if method == "recjpq":
            return ops.pq_topk_query(q, cat.centroids, cat.codes, k)
        if method in ("lut", "matmul"):
            return ops.pq_topk_query(q, cat.centroids, cat.codes, k, algorithm=method)
        if method == "dense":
            return dense_topk(q, self.items, k)
        if method == "faiss":
            return faiss_topk(self.index, q, k)
        return split_loop_topk(cat, q, k)

    def run_cell(self, c: dict) -> dict:
        args = self.args
        row = dict(c, skipped={})
        methods = []
        for method in ["recjpq", *args.variants, *PEERS]:
            need = _bytes(method, c)
            predicted = self.coef.get(method, 0.0) * _work(method, c)
            if need > args.mem_gb * 2 ** 30:
                row["skipped"][method] = f"needs {need / 2 ** 30:.1f} GiB"
            elif method != "recjpq" and predicted > args.max_call:
                row["skipped"][method] = f"~{predicted:.0f} s per call predicted"
            else:
                methods.append(method)
        self._prepare(c, methods)
        q = self.cat.queries[:c["b"]].contiguous()
        times = {m: [] for m in methods}
        cpu = {m: [] for m in methods}
        load = [os.getloadavg()[0]]
        results = {m: self._call(m, q, c["k"]) for m in methods}  # warm-up: caches, layouts, tables
        start = time.perf_counter()
        for r in itertools.count():
            order = random.Random(r).sample(methods, len(methods))  # no method always follows the same one
            for m in order:
                t0, c0 = time.perf_counter(), time.process_time()
                self._call(m, q, c["k"])
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
            spent = time.perf_counter() - start
            if r + 1 >= args.max_rounds or (r + 1 >= args.min_rounds and spent >= args.cell_time):
                break
            if spent > args.max_call:  # very slow cells: a single round
                break
        load.append(os.getloadavg()[0])
        # every method runs on --threads threads: with 1, CPU time is its work without the waits a
        # loaded machine adds to wall time; both are kept
        row["ms"] = {m: 1e3 * statistics.median(ts) for m, ts in cpu.items()}
        row["wall_ms"] = {m: 1e3 * statistics.median(ts) for m, ts in times.items()}
        row["rounds"] = len(times["recjpq"])
        row["load"] = load
        row["path"] = "matmul" if _decoded.prefers_matmul(c["b"], c["n"], c["d"], c["m"], c["k"]) else "lut"
        for m, ts in times.items():
            self.coef[m] = min(ts) / _work(m, c)  # the latest (largest) cell predicts the next; wall time
        peers = {m: t for m, t in row["ms"].items() if m in PEERS}
        if peers:
            best = min(peers, key=peers.get)
            row["best_peer"], row["speedup"] = best, peers[best] / row["ms"]["recjpq"]
            wall = {m: t for m, t in row["wall_ms"].items() if m in PEERS}
            row["speedup_wall"] = min(wall.values()) / row["wall_ms"]["recjpq"]
        values, indices = results["recjpq"]
        if "split_loop" in results:  # the split loop adds splits in order: its values are the reference's
            row["values_match_split_loop"] = bool(torch.equal(values, results["split_loop"][0]))
        if "dense" in results:
            dense_ids = results["dense"][1]
            row["overlap_dense"] = float((indices.unsqueeze(2) == dense_ids.unsqueeze(1)).any(2).float().mean())
        return row


def _cells(args):
    if args.full or any(getattr(args, a) for a in "nbdmk"):
        grid = {a: getattr(args, a) or FULL[a] for a in "nbdmk"}
        cells = [dict(n=n, b=b, d=d, m=m, k=k) for n, d, m, k, b in
                 itertools.product(grid["n"], grid["d"], grid["m"], grid["k"], grid["b"]) if d % m == 0 and k <= n]
    else:
        cells = list(DEFAULT_CELLS)
    # one catalogue at a time, cheap cells first, so that costs learned on small cells predict big ones
    return sorted(cells, key=lambda c: (c["n"], c["d"], c["m"], c["k"], c["b"]))


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else (f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def table(rows, variants) -> str:
    head = ["N", "d", "M", "k", "B", "path", "recjpq ms", *[f"{v} ms" for v in variants], "dense ms", "FAISS ms",
            "split loop ms", "best peer", "speed-up", "wall speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "ms" not in r:
            continue
        cells = [f"{r['n']:,}", r["d"], r["m"], r["k"], r["b"], r["path"], _fmt(r["ms"]["recjpq"]),
                 *[_fmt(r["ms"].get(v)) for v in variants],
                 *[_fmt(r["ms"].get(p)) if p in r["ms"] else "skipped" for p in PEERS],
                 r.get("best_peer", "-"), f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                 f"{r['speedup_wall']:.2f}x" if "speedup_wall" in r else "-"]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def heatmap(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if "speedup" in r]
    shapes = sorted({(r["d"], r["m"], r["k"], r["n"]) for r in rows})
    batches = sorted({r["b"] for r in rows})
    grid = np.full((len(shapes), len(batches)), np.nan)
    for r in rows:
        grid[shapes.index((r["d"], r["m"], r["k"], r["n"])), batches.index(r["b"])] = r["speedup"]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(batches), 1.0 + 0.32 * len(shapes)))
    logs = np.log10(grid)
    span = max(1.0, float(np.nanmax(np.abs(logs))))
    ax.imshow(logs, cmap="RdYlGn", vmin=-span, vmax=span, aspect="auto")
    for i, j in itertools.product(range(len(shapes)), range(len(batches))):
        if not np.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2g}x", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(batches)), [f"B={b}" for b in batches])
    ax.set_yticks(range(len(shapes)), [f"d={d} M={m} k={k} N={n:,}" for d, m, k, n in shapes], fontsize=7)
    ax.set_title("recjpq default pq_topk_query: speed-up over the best peer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a, name in zip("nbdmk", ("catalogue sizes N", "batch sizes B", "dims d", "splits M", "k values")):
        p.add_argument(f"--{a}", type=int, nargs="+", help=f"{name} (default: the subset; with --full: all)")
    p.add_argument("--full", action="store_true", help="the whole N x B x d x M x k grid of issue 17")
    p.add_argument("--variants", nargs="*", default=[], choices=["lut", "matmul"],
                   help="also time recjpq with these forced algorithms")
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (default 1: a shared machine)")
    p.add_argument("--mem-gb", type=float, default=6.0, help="skip a method whose arrays need more")
    p.add_argument("--max-call", type=float, default=5.0, help="skip a peer predicted slower than this per call (s)")
    p.add_argument("--cell-time", type=float, default=1.0, help="time each cell's rounds for about this long (s)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--max-rounds", type=int, default=25)
    p.add_argument("--budget", type=float, default=840.0, help="stop starting cells after this many seconds")
    p.add_argument("--out", default="bench/results/shape_grid.json")
    p.add_argument("--png", default="bench/results/shape_grid.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss
        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        raise SystemExit("bench/shape_grid.py needs faiss-cpu for the FAISS IndexPQ peer")
    cells = _cells(args)
    args.b_all = sorted({c["b"] for c in cells})
    grid = Grid(args)
    rows, not_run = [], []
    for c in cells:
        if time.perf_counter() > grid.deadline:
            not_run.append(c)
            continue
        rows.append(grid.run_cell(c))
        r = rows[-1]
        print(f"N={c['n']} d={c['d']} M={c['m']} k={c['k']} B={c['b']}: "
              + " ".join(f"{m} {_fmt(t)}" for m, t in r["ms"].items())
              + (f" -> {r['speedup']:.2f}x over {r['best_peer']}" if "speedup" in r else "")
              + f" (load {r['load'][0]:.1f})", flush=True)
    print()
    print(table(rows, args.variants))
    under = [r for r in rows if r.get("speedup", 1.0) < 1.0]
    print(f"\n{len(rows)} cells run, {len(not_run)} not run (budget); {len(under)} under 1.0x"
          + (f", the lowest {min(r['speedup'] for r in under):.2f}x" if under else ""))
    info = machine()
    info["threads"] = {"torch": torch.get_num_threads(), "faiss": args.threads}
    with open(args.out, "w") as f:
        json.dump({"machine": info, "args": {k: v for k, v in vars(args).items()}, "cells": rows,
                   "not_run": not_run}, f, indent=1)
    heatmap(rows, args.png)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
