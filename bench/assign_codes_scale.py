"""Time and peak memory of ``assign_codes`` on a large synthetic interaction log.

    python bench/assign_codes_scale.py --items 1000000 --interactions 10000000 --strategy svd
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import machine  # noqa: E402
from recjpq.codes import assign_codes  # noqa: E402


def power_law_log(num_users: int, num_items: int, num_interactions: int, seed: int = 0):
    """Users and items drawn with Zipf-like popularity, as real logs are."""
    rng = np.random.default_rng(seed)
    items = np.minimum((rng.pareto(1.2, num_interactions) * num_items / 50).astype(np.int64), num_items - 1)
    users = rng.integers(0, num_users, num_interactions)
    return users, rng.permutation(num_items)[items]


def log_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every code-assignment scale benchmark takes: the synthetic log's size, M and
    the results folder."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def main(argv=None):
    p = log_parser(__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="svd")
    args = p.parse_args(argv)
    log = power_law_log(args.users, args.items, args.interactions)
    t0 = time.perf_counter()
    codes = assign_codes(log, args.items, args.splits, strategy=args.strategy)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = [np.bincount(codes[:, m].numpy(), minlength=256) for m in range(args.splits)]
    result = {"items": args.items, "users": args.users, "interactions": args.interactions,
              "splits": args.splits, "strategy": args.strategy, "seconds": round(seconds, 2),
              "peak_rss_mb": round(peak_mb), "code_count_min": int(min(c.min() for c in counts)),
              "code_count_max": int(max(c.max() for c in counts)), "machine": machine()}
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"assign_codes_{args.strategy}_{args.items}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
