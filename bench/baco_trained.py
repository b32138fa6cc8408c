"""What each part of BACO item codes buys in a trained model: RecJPQ items with svd, random, spectral
start only and spectral + refinement codes, the same training budget per cell.

    OMP_NUM_THREADS=1 nice -n 10 python bench/baco_trained.py --data ml-1m --epochs 8
    OMP_NUM_THREADS=1 nice -n 10 python bench/baco_trained.py --data gowalla --epochs 20

The trained counterpart of ``bench/baco_ablation.py``'s training-free proxy. Every strategy gets the
same split, model, seed, M, K and number of epochs (no early stop). Sequential sets: SASRec, the
best validation epoch kept and tested on every user (leave-one-out, full ranking, history
excluded), test NDCG@10. Gowalla (LightGCN split, no order): MF-BPR with private user rows
(``recjpq train-cf --embedding recjpq``), the best of the evaluations every 5 epochs on the test
file (the protocol's practice), Recall@20. Differences come with paired bootstrap 95% intervals
over users.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.baco_ablation import DATASETS, paired_ci  # noqa: E402
from bench.peers import machine  # noqa: E402
from recjpq.cf import CFConfig, MF, build_tables, full_ranking, load_cf  # noqa: E402
from recjpq.cf import fit as fit_cf  # noqa: E402
from recjpq.data import leave_one_out, load_interactions  # noqa: E402
from recjpq.evaluation import ndcg_at, target_ranks  # noqa: E402
from recjpq.training import TrainConfig, fit  # noqa: E402

STRATEGIES = {"svd": "svd", "random": "random", "spectral": "spectral", "spectral+refine": "baco"}


def sequential_cell(data, test, codes: str, args) -> tuple[np.ndarray, dict]:
    """Per-user test NDCG@10 of SASRec-RecJPQ with these codes, and the run's figures."""
    config = TrainConfig(model="sasrec", embedding="recjpq", codes=codes, splits=args.splits, max_len=args.max_len,
                         lr=args.lr, epochs=args.epochs, patience=args.epochs, valid_users=args.valid_users,
                         exclude_seen=True, seed=args.seed)
    run = fit(data, config, progress=False, log_epochs=True)
    ranks = target_ranks(run.model, test, 10, exclude_seen=True)
    ndcg = ndcg_at(ranks, 10)
    return ndcg, {"ndcg@10": round(float(ndcg.mean()), 5), "recall@10": round(float((ranks < 10).mean()), 5),
                  "best_epoch": run.best_epoch,
                  "valid_ndcg@10": [round(h["ndcg@10"], 5) for h in run.history if "ndcg@10" in h],
                  "train_seconds": round(run.train_seconds, 1)}


def cf_cell(data, codes: str, args) -> tuple[np.ndarray, dict]:
    """Per-user Recall@20 of MF-BPR with RecJPQ items (these codes) at its best evaluation, and the run's figures."""
    config = CFConfig(model="mf", embedding="recjpq", codes=codes, splits=args.splits, epochs=args.epochs,
                      eval_every=5, seed=args.seed)
    with tempfile.TemporaryDirectory() as out:  # the run's checkpoints
        summary = fit_cf(config, data, out, progress=False, log=print)
        model = MF(*build_tables(config, data, os.path.join(out, "ids.pt")))  # the codes fit assigned
        model.load_state_dict(torch.load(os.path.join(out, "best.pt"), weights_only=True))
    recall = full_ranking(*model.embeddings(), data.train, data.test, k=20)["per_user_recall"]
    return recall, {"recall@20": round(float(recall.mean()), 5), "ndcg@20": summary["best"]["ndcg@20"],
                    "best_epoch": summary["best"]["epoch"], "embedding_params": summary["embedding_params"],
                    "recall@20_by_epoch": [h["recall@20"] for h in summary["history"]],
                    "train_seconds": summary["best"]["train_seconds"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["ml-1m"], choices=list(DATASETS))
    p.add_argument("--root", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--epochs", type=int, default=8, help="per cell (Gowalla: MF epochs)")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--valid-users", type=int, default=1000)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    for name in args.data:
        path = args.root / DATASETS[name]
        if not path.exists():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        gowalla = name == "gowalla"
        if gowalla:
            data = load_cf(str(path))
        else:
            data = load_interactions(str(path))
            test = leave_one_out(data.sequences).test  # the split fit makes: same users, same order
        result = {"data": name, "model": "mf" if gowalla else "sasrec", "epochs": args.epochs, "splits": args.splits,
                  "num_codes": 256, "machine": machine(), "strategies": {}, "paired": {},
                  "metric": ("Recall@20, full ranking, training items excluded, best of evaluations every 5 epochs"
                             if gowalla else "test NDCG@10, full ranking, history excluded, best validation epoch")}
        per_user = {}
        for label in args.strategies:
            t0 = time.perf_counter()
            if gowalla:
                per_user[label], figures = cf_cell(data, STRATEGIES[label], args)
            else:
                per_user[label], figures = sequential_cell(data, test, STRATEGIES[label], args)
            result["strategies"][label] = {"codes": STRATEGIES[label], **figures,
                                           "seconds": round(time.perf_counter() - t0, 1)}
            print(name, label, json.dumps(result["strategies"][label]), flush=True)
        for a, b in (("spectral+refine", "spectral"), ("spectral+refine", "svd"), ("spectral", "svd"),
                     ("svd", "random")):
            if a in per_user and b in per_user:
                result["paired"][f"{a} vs {b}"] = paired_ci(per_user[a], per_user[b], args.resamples, args.seed)
        print(json.dumps(result["paired"], indent=1))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"baco_trained_{name}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
