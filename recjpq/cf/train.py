"""BPR training of MF / LightGCN with full, BACO-shared, hashed, low-rank or RecJPQ (product-quantised
items) embedding tables: progress
bar, evaluation every few epochs, time limit, resumable checkpoint and ``metrics.json``."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from recjpq.cf.data import CFData
from recjpq.cf.metrics import full_ranking
from recjpq.cf.models import MF, LightGCN, normalized_adjacency

MODELS = ("mf", "lightgcn")
EMBEDDINGS = ("full", "baco", "hash", "lowrank", "recjpq")
SAMPLERS = ("pairs", "users")


@dataclass
class CFConfig:
    model: str = "mf"
    embedding: str = "full"
    dim: int = 64
    layers: int = 3
    budget: float = 0.25  # embedding parameters of a compressed model / those of the full one
    tables: int = 4  # shared tables (ids) per entity for baco / hash
    epochs: int = 1000
    batch_size: int = 2048
    lr: float = 1e-3
    l2: float = 1e-4  # LightGCN's reg: l2 / 2 * squared norm of the batch's ego embeddings, per example
    eval_every: int = 5
    k: int = 20
    time_limit: float | None = None
    seed: int = 0
    baco_sweeps: int = 20
    baco_alpha: float = 1.0
    codes: str = "svd"  # recjpq: the item code strategy (recjpq.codes.STRATEGIES), splits M, sub-ids K
    splits: int = 8
    num_codes: int = 256
    device: str = "cpu"  # where training and evaluation run ("cuda" on a GPU); ids are built on the CPU
    sampler: str = "pairs"  # "pairs": each epoch visits every training pair once; "users": the LightGCN
    # reference code's, as many (user, positive) draws per epoch with users drawn uniformly

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        from recjpq.codes import STRATEGIES
        if self.codes not in STRATEGIES:
            raise ValueError(f"codes must be one of {STRATEGIES}, got {self.codes!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for name in ("dim", "tables", "epochs", "batch_size", "eval_every", "k", "splits", "num_codes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        if not self.lr > 0 or self.l2 < 0:
            raise ValueError(f"lr must be > 0 and l2 >= 0, got {self.lr}, {self.l2}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from e


# the configuration fields that decide a table's ids (and so the cached ids.pt); recjpq's codes also
# depend on _CODE_FIELDS
_ID_FIELDS = ("embedding", "budget", "tables", "seed", "baco_sweeps", "baco_alpha")
_CODE_FIELDS = ("codes", "splits", "num_codes")


def _cached_ids(ids_cache: str | None, key: dict, compute):
    """``(user_ids, item_ids)`` from ``ids_cache`` where it was written for ``key``, else from
    ``compute()``, then written there."""
    if ids_cache and os.path.exists(ids_cache):
        cached = torch.load(ids_cache, weights_only=True)
        if cached["key"] == key:
            return cached["user_ids"], cached["item_ids"]
    user_ids, item_ids = compute()
    if ids_cache:
        torch.save({"key": key, "user_ids": user_ids, "item_ids": item_ids}, ids_cache)
    return user_ids, item_ids


def build_tables(config: CFConfig, data: CFData, ids_cache: str | None = None) -> tuple[nn.Module, nn.Module]:
    """User and item tables. ``full``: private rows of ``dim``. ``lowrank``: private rows of
    ``budget * dim``. ``baco`` / ``hash``: ``ClusterEmbedding`` with ``tables`` ids per entity and
    ``budget * (users + items) / (2 * tables)`` rows per table, ids from multi-level BACO
    co-clusters of the training graph (users and items share each level's labels) or from random
    balanced hashing. ``recjpq``: private user rows, items as a ``PQEmbedding`` with ``splits``
    codes of ``num_codes`` sub-ids each from the ``codes`` strategy on the training pairs.
    ``ids_cache``: a file keeping the baco / hash ids or the recjpq codes of this configuration and
    data, reused when they match (co-clustering a large graph takes minutes on a CPU)."""
    from recjpq.codes import assign_codes
    from recjpq.codes.baco import level_codes
    from recjpq.nn import ClusterEmbedding, PQEmbedding

    nu, ni, d = data.num_users, data.num_items, config.dim
    if config.embedding in ("full", "lowrank"):
        width = d if config.embedding == "full" else max(1, int(config.budget * d))
        return nn.Embedding(nu, width), nn.Embedding(ni, width)
    pairs = hashlib.sha256(data.train_users.tobytes())
    pairs.update(data.train_items.tobytes())
    fields = _ID_FIELDS + (_CODE_FIELDS if config.embedding == "recjpq" else ())
    key = {name: getattr(config, name) for name in fields} | {"users": nu, "items": ni,
                                                              "train_pairs": pairs.hexdigest()}
    if config.embedding == "recjpq":
        _, codes = _cached_ids(ids_cache, key, lambda: (None, assign_codes(
            (data.train_users, data.train_items), ni, config.splits, config.num_codes, strategy=config.codes,
            seed=config.seed)))
        return nn.Embedding(nu, d), PQEmbedding(codes, d, config.num_codes)
    rows = int(config.budget * (nu + ni)) // (2 * config.tables)
    if rows < 1:
        raise ValueError(f"budget {config.budget} leaves no rows for {2 * config.tables} tables")
    sizes = [rows] * config.tables

    def shared_ids():
        if config.embedding == "hash":
            g = torch.Generator().manual_seed(config.seed)
            return (torch.stack([torch.randperm(nu, generator=g) % rows for _ in sizes], 1),
                    torch.stack([torch.randperm(ni, generator=g) % rows for _ in sizes], 1))
        codes = level_codes((torch.from_numpy(data.train_users), torch.from_numpy(data.train_items)), sizes,
                            num_users=nu, num_items=ni, alpha=config.baco_alpha, sweeps=config.baco_sweeps,
                            seed=config.seed)
        return codes.user_codes, codes.item_codes

    user_ids, item_ids = _cached_ids(ids_cache, key, shared_ids)
    return ClusterEmbedding(user_ids, d, sizes), ClusterEmbedding(item_ids, d, sizes)


def _build_model(config: CFConfig, data: CFData, tables) -> nn.Module:
    from recjpq.nn import PQEmbedding

    torch.manual_seed(config.seed)
    for table in tables:  # N(0, 0.1^2) per entity (LightGCN's init); a sum of J rows gets 0.1 / sqrt(J) per row
        if isinstance(table, PQEmbedding):  # a concatenation of sub-item rows: 0.1 per entry as it is
            nn.init.normal_(table.subitem_embeddings, std=0.1)
        else:
            nn.init.normal_(table.weight, std=0.1 * len(getattr(table, "num_rows", [0])) ** -0.5)
    if config.model == "mf":
        return MF(*tables).to(config.device)
    adj = normalized_adjacency(data.train_users, data.train_items, data.num_users, data.num_items)
    return LightGCN(*tables, adj, layers=config.layers).to(config.device)


def _negatives(train_keys: torch.Tensor, users: torch.Tensor, num_items: int, generator,
               rounds: int = 4) -> torch.Tensor:
    """One uniform item per user that is not among the user's training items (the LightGCN / NGCF
    samplers'), by rejection: a drawn training item is redrawn. ``train_keys``: sorted
    ``user * num_items + item`` of the training pairs. Redraws run ``rounds`` at a time between
    checks; ``fit`` draws a whole epoch's at once, so a GPU waits for the host once per epoch, and
    the host queues the steps' kernels ahead of the device."""
    def draw():
        return torch.randint(0, num_items, users.shape, generator=generator, device=users.device)

    def seen(neg):
        keys = users * num_items + neg
        at = torch.searchsorted(train_keys, keys).clamp_max(train_keys.numel() - 1)
        return train_keys[at] == keys

    neg = draw()
    while True:  # terminates: fit checks that every user has an unseen item
        for _ in range(rounds):
            neg = torch.where(seen(neg), draw(), neg)
        if not bool(seen(neg).any()):
            return neg


def _epoch_pairs(users: torch.Tensor, items: torch.Tensor, num_users: int, sampler: str, generator):
    """One epoch's (user, positive item) pairs in training order. ``users`` sorted, as
    ``CFData`` keeps them. ``"users"`` gives every user the same weight, whatever its activity
    (Recall@K averages over users)."""
    if sampler == "pairs":
        order = torch.randperm(users.numel(), generator=generator, device=users.device)
        return users[order], items[order]
    degree = torch.bincount(users, minlength=num_users)
    start = degree.cumsum(0) - degree
    active = degree.nonzero().flatten()
    draw = active[torch.randint(0, active.numel(), users.shape, generator=generator, device=users.device)]
    offset = (torch.rand(users.shape, generator=generator, device=users.device) * degree[draw]).long()
    return draw, items[start[draw] + offset.clamp_max(degree[draw] - 1)]


def _evaluate(model, data: CFData, k: int) -> dict:
    model.eval()
    result = full_ranking(*model.embeddings(), data.train, data.test, k=k)
    model.train()
    return result


def fit(config: CFConfig, data: CFData, out: str | None = None, *, progress: bool = True, resume: bool = False,
        log=print) -> dict:
    """Trains, evaluating every ``eval_every`` epochs and at the end; keeps the best-Recall@K state.

    With ``out``: ``out/checkpoint.pt`` (model, optimiser, epoch, history; written at every
    evaluation, resumed from with ``resume``), ``out/best.pt`` (best model state) and
    ``out/metrics.json``. Returns the summary written to ``metrics.json``.
    """
    config.validate()
    device = torch.device(config.device)
    users = torch.from_numpy(data.train_users)
    items = torch.from_numpy(data.train_items)
    if torch.bincount(users, minlength=data.num_users).max() >= data.num_items:
        raise ValueError("a user has every item as a training item: no negative can be sampled for it")
    users, items = users.to(device), items.to(device)
    train_keys = (users * data.num_items + items).sort().values
    t_build = time.perf_counter()
    if out:
        os.makedirs(out, exist_ok=True)
    tables = build_tables(config, data, os.path.join(out, "ids.pt") if out else None)
    model = _build_model(config, data, tables)
    build_s = time.perf_counter() - t_build
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)  # about 3x foreach on one CPU thread (MF on Gowalla)
    params = sum(p.numel() for p in model.parameters())
    full_params = (data.num_users + data.num_items) * config.dim
    history, start_epoch, train_s, steps = [], 0, 0.0, 0
    best = {"epoch": 0, f"recall@{config.k}": -1.0}
    ckpt = os.path.join(out, "checkpoint.pt") if out else None
    if resume and ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False, map_location=device)
        free = ("epochs", "time_limit", "device")  # may change on resume
        written = asdict(CFConfig()) | state["config"]  # fields added since the checkpoint: their defaults
        if {k: v for k, v in written.items() if k not in free} != {
                k: v for k, v in asdict(config).items() if k not in free}:
            raise ValueError(f"{ckpt} was written with another configuration: {state['config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, best, train_s = state["epoch"], state["history"], state["best"], state["train_seconds"]
        steps = state["steps"]
    g = torch.Generator(device).manual_seed(config.seed * 1000003 + start_epoch)
    stopped = "epochs"
    epoch = start_epoch
    t_fit = time.perf_counter() - train_s
    for epoch in range(start_epoch + 1, config.epochs + 1):
        loss_sum, batches_run = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        epoch_users, epoch_items = _epoch_pairs(users, items, data.num_users, config.sampler, g)
        epoch_negatives = _negatives(train_keys, epoch_users, data.num_items, g)
        batches = zip(*(t.split(config.batch_size) for t in (epoch_users, epoch_items, epoch_negatives)))
        for u, pos, neg in tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False,
                           total=-(-users.numel() // config.batch_size)):
            eu, ei, eu0, ei0 = model(u, torch.cat([pos, neg]))
            ep, en = ei.chunk(2)
            loss = -nn.functional.logsigmoid((eu * (ep - en)).sum(1)).mean()
            reg = config.l2 * 0.5 * (eu0.square().sum() + ei0.square().sum()) / u.numel()
            optimizer.zero_grad()
            (loss + reg).backward()
            optimizer.step()
            loss_sum += loss.detach()
            batches_run += 1
            steps += 1
            if config.time_limit is not None and time.perf_counter() - t_fit >= config.time_limit:
                break  # mid-epoch: an epoch of LightGCN on a CPU can outlast the limit
        elapsed = time.perf_counter() - t_fit
        out_of_time = config.time_limit is not None and elapsed >= config.time_limit
        if epoch % config.eval_every == 0 or epoch == config.epochs or out_of_time:
            t_eval = time.perf_counter()
            metrics = _evaluate(model, data, config.k)
            row = {"epoch": epoch, "steps": steps, "loss": round(float(loss_sum) / batches_run, 5),
                   f"recall@{config.k}": round(metrics[f"recall@{config.k}"], 5),
                   f"ndcg@{config.k}": round(metrics[f"ndcg@{config.k}"], 5), "train_seconds": round(elapsed, 1),
                   "eval_seconds": round(time.perf_counter() - t_eval, 1)}
            history.append(row)
            if log:
                log(json.dumps(row))
            if row[f"recall@{config.k}"] > best[f"recall@{config.k}"]:
                best = row
                if out:
                    torch.save(model.state_dict(), os.path.join(out, "best.pt"))
            if ckpt:
                torch.save({"config": asdict(config), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history, "best": best,
                            "train_seconds": elapsed, "steps": steps}, ckpt)
            t_fit += time.perf_counter() - t_eval  # evaluation time is not training time
        if out_of_time:
            stopped = "time limit"
            break
    summary = {"config": asdict(config), "users": data.num_users, "items": data.num_items,
               "train_pairs": int(users.numel()), "test_pairs": int(data.test.nnz), "embedding_params": params,
               "params_vs_full": round(params / full_params, 4), "build_seconds": round(build_s, 1),
               "epochs_run": epoch, "stopped": stopped, "best": best, "last": history[-1] if history else None,
               "history": history, "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if out:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
