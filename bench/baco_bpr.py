"""BPR matrix factorisation with full, BACO-shared and ID-hashed embedding tables (Recall@20).

    nice -n 10 python bench/baco_bpr.py --data /work/shared/data/ml-1m/ml-1m.txt

The BACO claim shape: at least 75% fewer embedding rows than the full model at a small Recall@20
drop. Each compressed model gets the same row budget (``--budget`` of users + items), split per side
in proportion to the side's size: items get one table of ``k_i`` rows; users a primary table of
``k_i`` rows (BACO: the co-cluster shared with items) plus a secondary table with the rest of the
user budget. Hashing uses the same tables with random (universal-hash-like) ids. The split is a
seeded per-user random 80/20 holdout; all models share data, seed, epochs and optimiser.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import machine  # noqa: E402
from recjpq.codes import co_cluster  # noqa: E402
from recjpq.nn import ClusterEmbedding  # noqa: E402


def load_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``user item`` lines, or ``user i1 i2 ...`` lines; 1-based ids become 0-based, repeats dropped."""
    users, items = [], []
    for line in path.read_text().split("\n"):
        parts = line.split()
        if len(parts) >= 2:
            users.extend([int(parts[0])] * (len(parts) - 1))
            items.extend(int(x) for x in parts[1:])
    pairs = np.unique(np.stack([np.array(users) - 1, np.array(items) - 1], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def holdout(users, items, test_share: float, seed: int):
    rng = np.random.default_rng(seed)
    test = rng.random(users.size) < test_share
    counts = np.bincount(users, minlength=users.max() + 1)
    test &= counts[users] >= 2  # keep every user in training
    return (users[~test], items[~test]), (users[test], items[test])


class MatrixFactorisation(torch.nn.Module):
    def __init__(self, users: torch.nn.Module, items: torch.nn.Module):
        super().__init__()
        self.users, self.items = users, items

    def all_items(self) -> torch.Tensor:
        return self.items(torch.arange(self.items.num_embeddings))


def full_tables(num_users, num_items, dim):
    return torch.nn.Embedding(num_users, dim), torch.nn.Embedding(num_items, dim)


def baco_tables(train, num_users, num_items, dim, k_items, k_secondary, args):
    cc = co_cluster(train, k_items, num_secondary=k_secondary, num_users=num_users, num_items=num_items,
                    alpha=args.alpha, sweeps=args.sweeps, seed=args.seed)
    users = torch.stack([cc.user_clusters, cc.secondary_user_clusters], 1)
    return ClusterEmbedding(users, dim, [k_items, k_secondary]), ClusterEmbedding(cc.item_clusters, dim, k_items)


def hashed_tables(num_users, num_items, dim, k_items, k_secondary, seed):
    g = torch.Generator().manual_seed(seed)
    users = torch.stack([torch.randperm(num_users, generator=g) % k_items,
                         torch.randperm(num_users, generator=g) % k_secondary], 1)
    items = torch.randperm(num_items, generator=g) % k_items
    return ClusterEmbedding(users, dim, [k_items, k_secondary]), ClusterEmbedding(items, dim, k_items)


def train_bpr(model, train, num_items, args):
    torch.manual_seed(args.seed)
    for table in (model.users, model.items):
        torch.nn.init.normal_(table.weight, std=0.1)
    users, items = (torch.from_numpy(x).long() for x in train)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for batch in torch.randperm(users.numel(), generator=g).split(args.batch):
            u, pos = users[batch], items[batch]
            neg = torch.randint(0, num_items, (batch.numel(),), generator=g)
            eu, ep, en = model.users(u), model.items(pos), model.items(neg)
            loss = -torch.nn.functional.logsigmoid((eu * (ep - en)).sum(1)).mean()
            loss = loss + args.l2 * (eu.square().sum() + ep.square().sum() + en.square().sum()) / batch.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def recall_at(model, train, test, num_users, k: int = 20) -> float:
    item_table = model.all_items()
    seen = [[] for _ in range(num_users)]
    for u, i in zip(*train):
        seen[u].append(i)
    truth = [set() for _ in range(num_users)]
    for u, i in zip(*test):
        truth[u].add(i)
    evaluated = [u for u in range(num_users) if truth[u]]
    total = 0.0
    for chunk in np.array_split(np.array(evaluated), max(1, len(evaluated) // 1024)):
        scores = model.users(torch.from_numpy(chunk).long()) @ item_table.T
        for row, u in enumerate(chunk):
            scores[row, seen[u]] = -float("inf")
        top = scores.topk(k, dim=1).indices.numpy()
        total += sum(len(truth[u].intersection(t)) / len(truth[u]) for u, t in zip(chunk, top))
    return total / len(evaluated)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/work/shared/data/ml-1m/ml-1m.txt"))
    p.add_argument("--budget", type=float, default=0.25, help="rows of a compressed model / rows of the full one")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l2", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--sweeps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="full,baco,hash")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not args.data.exists():
        sys.exit(f"dataset {args.data} not found (see /work/shared/data/README.md)")
    users, items = load_pairs(args.data)
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    train, test = holdout(users, items, 0.2, args.seed)
    k_items = max(1, round(args.budget * num_items))
    k_secondary = max(1, round(args.budget * num_users) - k_items)
    rows_full = num_users + num_items
    results = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        if name == "full":
            tables = full_tables(num_users, num_items, args.dim)
        elif name == "baco":
            tables = baco_tables(train, num_users, num_items, args.dim, k_items, k_secondary, args)
        elif name == "hash":
            tables = hashed_tables(num_users, num_items, args.dim, k_items, k_secondary, args.seed)
        else:
            raise SystemExit(f"unknown model {name!r}")
        clustering_s = time.perf_counter() - t0
        model = MatrixFactorisation(*tables)
        t0 = time.perf_counter()
        train_bpr(model, train, num_items, args)
        rows = model.users.weight.shape[0] + model.items.weight.shape[0]
        row = {"model": name, "embedding_rows": rows, "rows_vs_full": round(rows / rows_full, 4),
               "recall@20": round(recall_at(model, train, test, num_users), 4),
               "clustering_s": round(clustering_s, 2), "train_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    full = next((r["recall@20"] for r in results if r["model"] == "full"), None)
    for r in results:
        if full:
            r["relative_drop"] = round(1.0 - r["recall@20"] / full, 4)
    out = {"data": str(args.data), "users": num_users, "items": num_items, "train": int(train[0].size),
           "test": int(test[0].size), "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "machine": machine()}
    print(json.dumps(out, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"baco_bpr_{args.data.parent.name}_alpha{args.alpha:g}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
