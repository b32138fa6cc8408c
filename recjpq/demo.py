"""``recjpq demo``: the whole pipeline on synthetic data in a few minutes on a laptop CPU.

Synthetic sequences -> SVD codes from the training split -> SASRec with dense and with RecJPQ
item embeddings, trained briefly -> full-ranking test metrics -> top-10 latency of dense
(matmul + topk) vs RecJPQ (``recjpq.ops.pq_topk`` on the fastest available backend) over
catalogues up to a million items. Prints one table and saves ``demo.png`` and ``demo.json``.
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from recjpq import backends, ops
from recjpq.codes import codes_dtype
from recjpq.data import generate_sequences
from recjpq.training import TrainConfig, fit

FULL = dict(users=4000, items=5000, mean_length=30, max_len=30, epochs=20, time_limit=60.0,
            catalogues=(10_000, 100_000, 1_000_000), batch=64, repeats=3)
QUICK = dict(users=300, items=400, mean_length=15, max_len=15, epochs=2, time_limit=10.0,
             catalogues=(1_000, 5_000), batch=8, repeats=2)
DIM, SPLITS, NUM_CODES, K = 64, 8, 256, 10


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: prepared layouts, allocator, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _latency(num_items: int, batch: int, repeats: int, device: torch.device) -> dict:
    """Milliseconds per batch of top-10 queries over a random catalogue of ``num_items``."""
    g = torch.Generator().manual_seed(num_items)
    queries = torch.randn(batch, DIM, generator=g).to(device)
    items = torch.randn(num_items, DIM, generator=g).to(device)
    codes = torch.randint(0, NUM_CODES, (num_items, SPLITS), generator=g).to(codes_dtype(NUM_CODES)).to(device)
    centroids = torch.randn(SPLITS, NUM_CODES, DIM // SPLITS, generator=g).to(device)

    def dense():
        torch.topk(queries @ items.t(), K, dim=1)

    def recjpq():
        ops.pq_topk(ops.subitem_scores(queries, centroids), codes, K)

    with torch.no_grad():
        out = {"items": num_items, "dense_ms": 1e3 * _median_seconds(dense, repeats),
               "recjpq_ms": 1e3 * _median_seconds(recjpq, repeats)}
    del items
    return out


def _plot(path: str, quality: list[dict], latency: list[dict], backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [q["model"] for q in quality]
    ndcg = [q["ndcg@10"] for q in quality]
    bars = left.bar(names, ndcg, color=["#4c72b0", "#dd8452"])
    for bar, q in zip(bars, quality):
        left.annotate(f"{q['ndcg@10']:.3f}\n{q['item_embedding_params']:,} item params",
                      (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    left.set_ylabel("NDCG@10 (full ranking, test)")
    left.set_ylim(0, max(ndcg) * 1.35 + 1e-3)
    left.set_title("Quality: SASRec on synthetic data")
    sizes = [r["items"] for r in latency]
    right.plot(sizes, [r["dense_ms"] for r in latency], "o-", label="dense: matmul + topk")
    right.plot(sizes, [r["recjpq_ms"] for r in latency], "s-", label=f"RecJPQ: pq_topk ({backend})")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("catalogue size (items)")
    right.set_ylabel(f"ms per batch of {latency[0].get('batch', '')} queries, top-{K}")
    right.set_title(f"Inference latency (d={DIM}, M={SPLITS}, K={NUM_CODES})")
    right.legend()
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out_dir: str = "demo_out", quick: bool = False) -> dict:
    p = QUICK if quick else FULL
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device("cpu")
    backend = backends.resolve(None, device, "pq_topk")
    started = time.perf_counter()
    data = generate_sequences(p["users"], p["items"], num_clusters=max(4, p["items"] // 100),
                              mean_length=p["mean_length"], seed=0)
    print(f"synthetic data: {len(data.sequences)} users, {data.num_items} items, {data.num_interactions} "
          f"interactions; pq_topk backend: {backend}; torch threads: {torch.get_num_threads()}")
    quality = []
    for embedding in ("dense", "recjpq"):
        config = TrainConfig(model="sasrec", embedding=embedding, codes="svd", splits=SPLITS, num_codes=NUM_CODES,
                             dim=DIM, max_len=p["max_len"], epochs=p["epochs"], time_limit=p["time_limit"],
                             patience=2, lr=2e-3, batch_size=128, valid_users=1000)
        print(f"training SASRec-{embedding} (at most {p['time_limit']:.0f} s)...")
        result = fit(data, config, progress=True)
        quality.append({"model": f"SASRec-{embedding}", **result.test,
                        "item_embedding_params": result.model.item_embedding_parameters(),
                        "train_seconds": round(result.train_seconds, 1), "epochs": len(result.history)})
    print(f"latency: top-{K} for {p['batch']} queries, median of {p['repeats']}...")
    latency = [{**_latency(n, p["batch"], p["repeats"], device), "batch": p["batch"]} for n in p["catalogues"]]

    dense, pq = quality
    lines = [
        f"| | dense | RecJPQ (SVD codes, M={SPLITS}, K={NUM_CODES}) |",
        "|---|---|---|",
        f"| NDCG@10 (test, full ranking) | {dense['ndcg@10']:.4f} | {pq['ndcg@10']:.4f} |",
        f"| Recall@10 | {dense['recall@10']:.4f} | {pq['recall@10']:.4f} |",
        f"| item-embedding parameters | {dense['item_embedding_params']:,} | {pq['item_embedding_params']:,} "
        f"({dense['item_embedding_params'] / pq['item_embedding_params']:.1f}x fewer) |",
        f"| training seconds (epochs) | {dense['train_seconds']} ({dense['epochs']}) | "
        f"{pq['train_seconds']} ({pq['epochs']}) |",
    ]
    for r in latency:
        lines.append(f"| top-{K} latency, {r['items']:,} items, batch {r['batch']} | {r['dense_ms']:.2f} ms | "
                     f"{r['recjpq_ms']:.2f} ms (speed-up {r['dense_ms'] / r['recjpq_ms']:.2f}x, {backend}) |")
    table = "\n".join(lines)
    print(table)
    summary = {"quality": quality, "latency": latency, "pq_topk_backend": backend,
               "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()},
               "seconds": round(time.perf_counter() - started, 1)}
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "demo.md"), "w") as f:
        f.write(table + "\n")
    _plot(os.path.join(out_dir, "demo.png"), quality, latency, backend)
    print(f"wrote {out_dir}/demo.png, demo.md, demo.json in {summary['seconds']} s")
    return summary
