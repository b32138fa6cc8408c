"""One table of ratios for a chosen (N, M, d, B, k): recjpq backends against the peers, one run.

    python bench/compare.py --n 1271638 --m 8 --d 512 --batch 1 64 --k 10

Every method starts from the same queries (so recjpq and the split loop include building S,
FAISS builds its own table, dense multiplies). Reports the median of ``--repeat`` runs after a
warm-up, checks each method's top-k against the reference backend, and writes JSON under
bench/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recjpq  # noqa: E402
from bench.peers import (Catalogue, dense_topk, faiss_index_pq, faiss_topk, machine,  # noqa: E402
                         recjpq_topk, split_loop_topk)


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (also builds any cached code layout)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def overlap(indices: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean fraction of each query's reference top-k that a method also returned."""
    hits = [len(set(a.tolist()) & set(b.tolist())) / b.numel() for a, b in zip(indices, reference)]
    return sum(hits) / len(hits)


def methods(cat: Catalogue, k: int, skip: set[str]):
    """(name, callable) pairs; each callable maps queries to (values, indices)."""
    out = [(f"recjpq[{b}]", lambda q, b=b: recjpq_topk(cat, q, k, backend=b))
           for b in recjpq.available_backends("cpu") if f"recjpq[{b}]" not in skip]
    if "split_loop" not in skip:
        out.append(("split_loop", lambda q: split_loop_topk(cat, q, k)))
    if "dense" not in skip:
        items = cat.item_matrix()
        out.append(("dense", lambda q: dense_topk(q, items, k)))
    if "faiss" not in skip:
        try:
            index = faiss_index_pq(cat)
            out.append(("faiss", lambda q: faiss_topk(index, q, k)))
        except (ImportError, ValueError) as e:
            print(f"faiss peer skipped: {e}", file=sys.stderr)
    return out


def run(n, m, d, batches, k, num_codes=256, repeat=5, skip=(), seed=0):
    cat = Catalogue(n, m, d, max(batches), num_codes=num_codes, seed=seed)
    rows = []
    for batch in batches:
        q = cat.queries[:batch].contiguous()
        _, reference = recjpq_topk(cat, q, k, backend="reference")
        for name, fn in methods(cat, k, set(skip)):
            ms = median_ms(lambda: fn(q), repeat)
            rows.append({"method": name, "batch": batch, "ms": ms, "topk_overlap": overlap(fn(q)[1], reference)})
    return {"shape": {"n": n, "m": m, "d": d, "k": k, "num_codes": num_codes, "batches": list(batches)},
            "repeat": repeat, "machine": machine(), "rows": rows}


def print_table(result) -> None:
    """Per batch: each method's time and how many times slower it is than the fastest recjpq backend."""
    for batch in result["shape"]["batches"]:
        rows = [r for r in result["rows"] if r["batch"] == batch]
        ours = min((r["ms"] for r in rows if r["method"].startswith("recjpq[")), default=None)
        print(f"\nB={batch}  (N={result['shape']['n']}, M={result['shape']['m']}, d={result['shape']['d']}, "
              f"k={result['shape']['k']})")
        print(f"{'method':<22}{'ms':>10}{'x recjpq best':>15}{'top-k overlap':>15}")
        for r in sorted(rows, key=lambda r: r["ms"]):
            ratio = f"{r['ms'] / ours:.2f}" if ours else "-"
            print(f"{r['method']:<22}{r['ms']:>10.2f}{ratio:>15}{r['topk_overlap']:>15.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_271_638)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-codes", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out, e.g. dense recjpq[reference]")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    result = run(args.n, args.m, args.d, args.batch, args.k, args.num_codes, args.repeat, args.skip)
    print_table(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare_n{args.n}_m{args.m}_d{args.d}_k{args.k}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
