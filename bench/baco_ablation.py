"""What each part of BACO item codes buys: svd, random, spectral start only, spectral + refinement.

    OMP_NUM_THREADS=1 nice -n 10 python bench/baco_ablation.py --data ml-1m lastfm toys beauty sports gowalla

Training-free proxy (labelled as such in docs/baco.md): the code-histogram recommender
``score(u, i) = sum_m #(u's training items with i's code in split m)``, a full ranking with the
training items excluded and seeded jitter for ties; Recall@20 of the held-out items (each user's
last item for the sequential sets, the test file for Gowalla). It measures how well codes group
items that co-occur, with no model in between. Every strategy gets the same split, M and K;
differences come with paired bootstrap 95% intervals over users. Also reported per refined split:
the share of items the refinement moved and its objective before and after.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import machine  # noqa: E402
from recjpq.cf import load_cf  # noqa: E402
from recjpq.codes import assign_codes  # noqa: E402
from recjpq.codes.baco import item_codes  # noqa: E402

DATASETS = {
    "ml-1m": "ml-1m/ml-1m.txt", "lastfm": "lastfm-s3rec/LastFM.txt", "toys": "amazon-toys-s3rec/Toys_and_Games.txt",
    "beauty": "amazon-beauty-s3rec/Beauty.txt", "sports": "amazon-sports-s3rec/Sports_and_Outdoors.txt",
    "gowalla": "gowalla-lightgcn",
}
STRATEGIES = ("svd", "random", "spectral", "spectral+refine")


def leave_last_out(path: Path):
    """``user item ...`` (or ``user item``) lines, 1-based, in time order: each user's last item is held out."""
    seqs: dict[int, list[int]] = {}
    for line in path.read_text().split("\n"):
        parts = line.split()
        if len(parts) >= 2:
            seqs.setdefault(int(parts[0]) - 1, []).extend(int(x) - 1 for x in parts[1:])
    num_users, num_items = max(seqs) + 1, max(max(s) for s in seqs.values()) + 1
    train_u, train_i, test_u, test_i = [], [], [], []
    for u, seq in seqs.items():
        if len(seq) < 2:
            continue
        train_u += [u] * (len(seq) - 1)
        train_i += seq[:-1]
        test_u.append(u)
        test_i.append(seq[-1])
    train = sp.csr_matrix((np.ones(len(train_u), np.float32), (train_u, train_i)), shape=(num_users, num_items))
    test = sp.csr_matrix((np.ones(len(test_u), np.float32), (test_u, test_i)), shape=(num_users, num_items))
    train.data[:] = 1.0
    return train, test


def load(name: str, root: Path):
    path = root / DATASETS[name]
    if name == "gowalla":
        data = load_cf(str(path))
        return data.train, data.test
    return leave_last_out(path)


@torch.no_grad()
def proxy_recall(codes: torch.Tensor, train: sp.csr_matrix, test: sp.csr_matrix, k: int, num_codes: int,
                 seed: int, chunk: int = 2048) -> np.ndarray:
    """Per evaluated user: Recall@k of the code-histogram recommender."""
    n, m = codes.shape
    onehot = sp.csr_matrix((np.ones(n * m, np.float32), (np.repeat(np.arange(n), m),
                            (codes.long() + torch.arange(m) * num_codes).reshape(-1).numpy())), shape=(n, m * num_codes))
    jitter = torch.from_numpy(np.random.default_rng(seed).random(n).astype(np.float32) * 1e-3)
    users = np.flatnonzero(np.diff(test.indptr))
    recall = np.empty(users.size)
    for start in range(0, users.size, chunk):
        rows = users[start:start + chunk]
        hist = (train[rows] @ onehot).toarray()  # [rows, m * K] code counts
        scores = torch.from_numpy(np.ascontiguousarray((onehot @ hist.T).T, dtype=np.float32)) + jitter
        seen = train[rows].tocoo()
        scores[torch.from_numpy(seen.row).long(), torch.from_numpy(seen.col).long()] = -torch.inf
        top = scores.topk(k, dim=1).indices.numpy().copy()
        wanted = test[rows]
        hits = np.asarray(wanted[np.arange(rows.size)[:, None], top].sum(1)).ravel()
        recall[start:start + rows.size] = hits / np.diff(wanted.indptr)
    return recall


def paired_ci(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of ``a - b`` over users, its relative size, and a paired bootstrap 95% interval of both."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (resamples, a.size))
    diff = (a[idx] - b[idx]).mean(1)
    rel = diff / np.maximum(b[idx].mean(1), 1e-12)
    return {"diff": round(float((a - b).mean()), 5), "diff_ci95": [round(float(x), 5) for x in np.quantile(diff, [0.025, 0.975])],
            "relative": round(float((a - b).mean() / max(b.mean(), 1e-12)), 4),
            "relative_ci95": [round(float(x), 4) for x in np.quantile(rel, [0.025, 0.975])]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--root", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--num-codes", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    for name in args.data:
        if not (args.root / DATASETS[name]).exists():
            print(f"skipping {name}: {args.root / DATASETS[name]} not found", file=sys.stderr)
            continue
        train, test = load(name, args.root)
        pairs = train.tocoo()
        log = (pairs.row.astype(np.int64), pairs.col.astype(np.int64))
        n = train.shape[1]
        result = {"data": name, "users": train.shape[0], "items": n, "train_pairs": int(train.nnz),
                  "test_users": int(np.diff(test.indptr).astype(bool).sum()), "splits": args.splits,
                  "num_codes": args.num_codes, "metric": f"proxy recall@{args.k} (code-histogram recommender)",
                  "strategies": {}, "refinement": []}
        recalls = {}
        for strategy in STRATEGIES:
            t0 = time.perf_counter()
            if strategy in ("svd", "random"):
                codes = assign_codes(log, n, args.splits, args.num_codes, strategy=strategy, seed=args.seed)
            else:
                refined = 0 if strategy == "spectral" else None
                report = result["refinement"].append if refined is None else None
                codes = item_codes(log, n, args.splits, args.num_codes, seed=args.seed, refined_splits=refined,
                                   progress=(lambda r: report(r) if "items_changed" in r else None) if report else None)
            seconds = time.perf_counter() - t0
            recalls[strategy] = proxy_recall(codes, train, test, args.k, args.num_codes, args.seed)
            result["strategies"][strategy] = {"recall": round(float(recalls[strategy].mean()), 5),
                                              "codes_seconds": round(seconds, 2),
                                              "unique_tuples": round(torch.unique(codes.long(), dim=0).shape[0] / n, 4)}
            print(name, strategy, result["strategies"][strategy], file=sys.stderr, flush=True)
        comparisons = [("spectral+refine", "svd"), ("spectral", "svd"), ("spectral+refine", "spectral"),
                       ("svd", "random")]
        result["paired"] = {f"{a} vs {b}": paired_ci(recalls[a], recalls[b], args.resamples, args.seed)
                            for a, b in comparisons}
        result["machine"] = machine()
        result["load_average"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        print(json.dumps(result, indent=1))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"baco_ablation_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
