"""Time and peak memory of BACO item codes (and optionally the co-clustering) on a large synthetic log.

    nice -n 10 python bench/baco_scale.py --items 1000000 --interactions 10000000
    nice -n 10 python bench/baco_scale.py --items 1000000 --interactions 10000000 --co-cluster 250000
    nice -n 10 python bench/baco_scale.py --threads 1 --torch-path  # the refinement without the C++ kernels
    nice -n 10 python bench/baco_scale.py --threads 1 --data ml-1m toys  # real logs: both paths, same codes?

The log is ``bench/assign_codes_scale.power_law_log`` (Zipf-like item popularity), the same one the
svd strategy is timed on, so the two JSON files compare directly.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.assign_codes_scale import log_parser, power_law_log  # noqa: E402
from bench.baco_ablation import DATASETS, load  # noqa: E402
from bench.peers import machine  # noqa: E402
from recjpq.codes import baco, co_cluster  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


@contextlib.contextmanager
def two_hop_path(torch_path: bool):
    """Refine with the pure-torch reference (``torch_path``) or the C++ kernels when built; yields
    the path's name."""
    native = baco._native_two_hop
    if torch_path:
        baco._native_two_hop = lambda device: False
    try:
        yield "native" if baco._native_two_hop(torch.device("cpu")) else "torch"
    finally:
        baco._native_two_hop = native


def real_data(args):
    """Default ``item_codes`` on real logs (the training part of ``bench/baco_ablation.py``'s
    split), once per refinement path: time, and whether both paths give the same codes."""
    rows = []
    for name in args.data:
        if not (args.root / DATASETS[name]).exists():
            print(f"skipping {name}: {args.root / DATASETS[name]} not found", file=sys.stderr)
            continue
        train = load(name, args.root)[0].tocoo()
        log = (train.row.astype(np.int64), train.col.astype(np.int64))
        row, codes = {"data": name, "users": train.shape[0], "items": train.shape[1], "pairs": int(train.nnz)}, []
        for torch_path in (False, True):
            with two_hop_path(torch_path) as path:
                t0, cpu0 = time.perf_counter(), _cpu_seconds()
                codes.append(baco.item_codes(log, train.shape[1], args.splits, seed=0))
                row[path] = {"seconds": round(time.perf_counter() - t0, 2),
                             "cpu_seconds": round(_cpu_seconds() - cpu0, 2)}
        row["same_codes"] = bool(torch.equal(codes[0], codes[1]))
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return {"what": "default item_codes (M = %d, K = 256), C++ kernels ('native') vs the torch path" % args.splits,
            "datasets": rows, "load_average": _load_average(), "machine": machine()}


def main(argv=None):
    p = log_parser(__doc__.split("\n\n")[0])
    p.add_argument("--refined-splits", type=int, default=None, help="item_codes refined_splits (default: half)")
    p.add_argument("--sweeps", type=int, default=10, help="item_codes sweeps per refined split")
    p.add_argument("--co-cluster", type=int, default=0, metavar="K",
                   help="also time co_cluster with K clusters and K secondary user clusters")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--torch-path", action="store_true",
                   help="refine with the pure-torch reference instead of the C++ kernels (recjpq._C)")
    p.add_argument("--data", nargs="+", choices=list(DATASETS),
                   help="time real logs instead (both paths), into baco_scale_real_data.json")
    p.add_argument("--root", type=Path, default=Path("/work/shared/data"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data:
        (args.out / "baco_scale_real_data.json").write_text(json.dumps(real_data(args), indent=1))
        return
    with two_hop_path(args.torch_path) as path:
        synthetic(args, path)


def synthetic(args, two_hop: str):
    log = power_law_log(args.users, args.items, args.interactions)
    rss_before = _peak_rss_mb()
    load_before = _load_average()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    splits = []  # per refined split: sweeps, items changed, objective before/after, and when it ended
    codes = baco.item_codes(log, args.items, args.splits, seed=0, refined_splits=args.refined_splits,
                            sweeps=args.sweeps,
                            progress=lambda r: splits.append({**r, "at_seconds": round(time.perf_counter() - t0, 1)})
                            if "items_changed" in r else None)
    seconds, cpu_seconds = time.perf_counter() - t0, _cpu_seconds() - cpu0
    counts = np.stack([np.bincount(codes[:, m].numpy(), minlength=256) for m in range(args.splits)])
    unique = np.unique(codes.numpy(), axis=0).shape[0] / args.items
    result = {"items": args.items, "users": args.users, "interactions": args.interactions,
              "splits": args.splits, "strategy": "baco", "refined_splits": args.refined_splits,
              "sweeps": args.sweeps, "two_hop": two_hop, "seconds": round(seconds, 2), "refinement": splits,
              "cpu_seconds": round(cpu_seconds, 2), "peak_rss_mb": round(_peak_rss_mb()),
              "rss_after_log_mb": round(rss_before),
              "code_count_min": int(counts.min()), "code_count_max": int(counts.max()),
              "unique_code_tuples": round(unique, 4), "load_average_before": load_before,
              "load_average_after": _load_average(), "machine": machine()}
    if args.co_cluster:
        users, items = (torch.from_numpy(x) for x in log)
        t0 = time.perf_counter()
        cc = co_cluster((users, items), args.co_cluster, num_secondary=args.co_cluster,
                        num_users=args.users, num_items=args.items, sweeps=5, progress=True)
        result["co_cluster"] = {"clusters": args.co_cluster, "sweeps": 5, "seconds": round(time.perf_counter() - t0, 2),
                                "peak_rss_mb": round(_peak_rss_mb()),
                                "item_clusters_used": int(torch.unique(cc.item_clusters).numel())}
    print(json.dumps(result, indent=1))
    tag = ("" if args.refined_splits is None else f"_refined{args.refined_splits}") + (
        "_torch_path" if args.torch_path else "") + (f"_threads{args.threads}" if (args.threads or 1) > 1 else "")
    (args.out / f"baco_scale_{args.items}{tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
