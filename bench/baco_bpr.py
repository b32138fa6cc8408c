"""BPR matrix factorisation with full, BACO-coded and ID-hashed embedding tables (Recall@20).

    OMP_NUM_THREADS=1 nice -n 10 python bench/baco_bpr.py --data /work/shared/data/ml-1m/ml-1m.txt

The BACO claim shape: at least 75% fewer embedding parameters than the full model at a small
Recall@20 drop. A compressed side (users or items) is a ``ClusterEmbedding``: an entity's embedding
is the sum of one row from each of ``J`` small tables, so entities get (near-)unique row
combinations at a fraction of the rows. ``baco`` takes the ids from balanced co-clustering of the
training graph (``recjpq.codes.baco.level_codes``: similar entities share rows); ``hash`` gives the
very same tables random, balanced ids (ID hashing); ``small`` is the full model with the embedding
dimension cut to the budget. The split is a seeded per-user random holdout; all models share data,
seed, negatives and optimiser; each model gets its own L2 grid (``--l2 MODEL=w1/w2``).
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
from recjpq.codes.baco import level_codes  # noqa: E402
from recjpq.nn import ClusterEmbedding  # noqa: E402

MODELS = ("full", "baco", "hash", "small")


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


def hashed_ids(num: int, sizes: list[int], generator) -> torch.Tensor:
    """ID hashing: per table an independent random, balanced id (``randperm % rows``)."""
    return torch.stack([torch.randperm(num, generator=generator) % r for r in sizes], 1)


def train_bpr(model, train, num_items, args, l2: float, log=None):
    torch.manual_seed(args.seed)
    for table in (model.users, model.items):  # a sum of J rows starts with the spread of one full row
        torch.nn.init.normal_(table.weight, std=0.1 * len(getattr(table, "num_rows", [0])) ** -0.5)
    users, items = (torch.from_numpy(x).long() for x in train)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        for batch in torch.randperm(users.numel(), generator=g).split(args.batch):
            u, pos = users[batch], items[batch]
            neg = torch.randint(0, num_items, (batch.numel(),), generator=g)
            eu, ep, en = model.users(u), model.items(pos), model.items(neg)
            loss = -torch.nn.functional.logsigmoid((eu * (ep - en)).sum(1)).mean()
            loss = loss + l2 * (eu.square().sum() + ep.square().sum() + en.square().sum()) / batch.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log is not None and args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            log(epoch + 1)


@torch.no_grad()
def recall_at(model, seen: sp.csr_matrix, truth: sp.csr_matrix, k: int = 20, chunk: int = 512) -> float:
    """Mean over users with test items of |top-k (seen items excluded) & test| / |test|."""
    item_table = model.all_items()
    evaluated = np.flatnonzero(np.diff(truth.indptr))
    total = 0.0
    for start in range(0, evaluated.size, chunk):
        rows = evaluated[start:start + chunk]
        scores = model.users(torch.from_numpy(rows)) @ item_table.T
        mask = seen[rows].tocoo()
        scores[torch.from_numpy(mask.row).long(), torch.from_numpy(mask.col).long()] = -torch.inf
        top = scores.topk(k, dim=1).indices.numpy().copy()
        wanted = truth[rows]
        hits = np.asarray(wanted[np.arange(rows.size)[:, None], top].sum(1)).ravel()
        total += float((hits / np.diff(wanted.indptr)).sum())
    return total / evaluated.size


def parse_l2(values: list[str]) -> dict[str, list[float]]:
    """``--l2 1e-3 --l2 baco,hash=1e-4/1e-3``: L2 weights for every model, then per-model ones (a
    model trains once per weight, on the same codes)."""
    out = {}
    for v in values:
        name, _, weights = v.rpartition("=")
        for model in (name.split(",") if name else MODELS):
            out[model] = [float(w) for w in weights.split("/")]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("/work/shared/data/ml-1m/ml-1m.txt"))
    p.add_argument("--budget", type=float, default=0.25,
                   help="embedding parameters of a compressed model / those of the full one")
    p.add_argument("--user-tables", type=int, default=4, help="tables (ids) per user in baco/hash")
    p.add_argument("--item-tables", type=int, default=4, help="tables (ids) per item in baco/hash")
    p.add_argument("--compress", choices=("both", "users", "items"), default="both",
                   help="which side baco/hash compress (diagnostics; the other keeps its full table)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=0, help="also print Recall@20 every this many epochs")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--l2", action="append", default=None,
                   help="L2 weights w1/w2/..., or MODEL[,MODEL]=w1/w2/... (repeatable; default 3e-3)")
    p.add_argument("--alpha", type=float, default=1.0, help="BACO node weight exponent (deg ** alpha)")
    p.add_argument("--sweeps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codes-file", type=Path, help="reuse the baco codes saved here (computed and saved if absent; "
                   "only valid for the same data, seed, tables, alpha and sweeps)")
    p.add_argument("--progress", action="store_true", help="report co-clustering sweeps on stderr")
    p.add_argument("--models", default="full,baco,hash")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    l2 = parse_l2(args.l2 or ["3e-3"])
    if not args.data.exists():
        sys.exit(f"dataset {args.data} not found (see /work/shared/data/README.md)")
    users, items = load_pairs(args.data)
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    train, test = holdout(users, items, 0.2, args.seed)
    seen = sp.csr_matrix((np.ones(train[0].size, np.float32), train), shape=(num_users, num_items))
    truth = sp.csr_matrix((np.ones(test[0].size, np.float32), test), shape=(num_users, num_items))
    params_full = (num_users + num_items) * args.dim
    # every table (level) gets the same rows; users and items share each level's co-clusters
    rows = int(args.budget * (num_users + num_items)) // (args.user_tables + args.item_tables)
    levels = [rows] * max(args.user_tables, args.item_tables)
    user_sizes, item_sizes = levels[:args.user_tables], levels[:args.item_tables]
    results = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        if name == "full":
            tables = torch.nn.Embedding(num_users, args.dim), torch.nn.Embedding(num_items, args.dim)
        elif name == "small":
            dim = int(args.budget * args.dim)
            tables = torch.nn.Embedding(num_users, dim), torch.nn.Embedding(num_items, dim)
        elif name == "baco":
            if args.codes_file and args.codes_file.exists():
                saved = torch.load(args.codes_file)
                user_ids, item_ids = saved["users"], saved["items"]
            else:
                codes = level_codes(train, levels, num_users=num_users, num_items=num_items, alpha=args.alpha,
                                    sweeps=args.sweeps, seed=args.seed, progress=args.progress)
                user_ids, item_ids = codes.user_codes[:, :args.user_tables], codes.item_codes[:, :args.item_tables]
                if args.codes_file:
                    torch.save({"users": user_ids, "items": item_ids}, args.codes_file)
            tables = ClusterEmbedding(user_ids, args.dim, user_sizes), ClusterEmbedding(item_ids, args.dim, item_sizes)
        elif name == "hash":
            g = torch.Generator().manual_seed(args.seed)
            tables = (ClusterEmbedding(hashed_ids(num_users, user_sizes, g), args.dim, user_sizes),
                      ClusterEmbedding(hashed_ids(num_items, item_sizes, g), args.dim, item_sizes))
        else:
            raise SystemExit(f"unknown model {name!r}, expected one of {MODELS}")
        codes_s = time.perf_counter() - t0
        if name in ("baco", "hash") and args.compress != "both":  # the other side keeps its full table
            full_side = torch.nn.Embedding(num_users if args.compress == "items" else num_items, args.dim)
            tables = (full_side, tables[1]) if args.compress == "items" else (tables[0], full_side)
        model = MatrixFactorisation(*tables)
        params = sum(t.numel() for t in model.parameters())
        for weight in l2[name]:
            def log(epoch, model=model, name=name, weight=weight):
                recall = round(recall_at(model, seen, truth), 4)
                print(json.dumps({"model": name, "l2": weight, "epoch": epoch, "recall@20": recall}), flush=True)

            t0 = time.perf_counter()
            train_bpr(model, train, num_items, args, weight, log)
            row = {"model": name, "l2": weight, "embedding_params": params,
                   "params_vs_full": round(params / params_full, 4),
                   "user_rows": list(getattr(model.users, "num_rows", [num_users])),
                   "item_rows": list(getattr(model.items, "num_rows", [num_items])),
                   "dim": model.items.embedding_dim, "recall@20": round(recall_at(model, seen, truth), 4),
                   "codes_s": round(codes_s, 2), "train_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
    full = max((r["recall@20"] for r in results if r["model"] == "full"), default=None)
    for r in results:
        if full:
            r["relative_drop"] = round(1.0 - r["recall@20"] / full, 4)  # against the best full model
    out = {"data": str(args.data), "users": num_users, "items": num_items, "train": int(train[0].size),
           "test": int(test[0].size), "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "machine": machine()}
    print(json.dumps(out, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    (args.out / f"baco_bpr_{args.data.parent.name}{suffix}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
