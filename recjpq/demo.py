"""``recjpq demo``: for a memory and a latency budget, what RecJPQ gains and what it loses.

Quality against memory: SASRec with a dense item table at several d and with RecJPQ item codes
at several (M, K), each trained for the same wall-clock budget on the same leave-one-out split,
scored by full-ranking test NDCG@10 against the bytes of the item representation (dense: the
float32 table; RecJPQ: the codes plus the float32 sub-item embeddings), Pareto front marked.

Latency against catalogue size and load: top-10 for one query over random catalogues of 10^4
to 10^6 items, through recjpq's default path (``ops.pq_topk_query``, ``backend=None``), a dense
matmul + ``torch.topk`` and FAISS ``IndexPQ`` holding the same codes (when installed), p50 and
p99, first on the machine as it is, then with one core kept busy by a spinning subprocess.

Data: the synthetic generator (fitted to ML-1M's statistics) or the user's interactions
(``--data``). Prints the tables and writes ``demo.md``, ``demo.json`` and, with matplotlib,
``demo.png``.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from recjpq import backends, ops
from recjpq._threading import one_torch_thread
from recjpq.codes import codes_dtype
from recjpq.data import SequenceData, generate_sequences, load_interactions
from recjpq.data.synthetic import sequence_statistics
from recjpq.training import TrainConfig, fit

K = 10
PLOT_HINT = "pip install 'recjpq[demo]'"


@dataclass
class Plan:
    """The sizes of one demo run: the data (when synthetic), the models, the latency grid."""

    users: int = 3000
    items: int = 2000
    mean_length: int = 25
    max_len: int = 30
    dense_dims: tuple = (8, 16, 32, 64)
    pq_dim: int = 64
    pq_shapes: tuple = ((4, 256), (8, 256), (16, 256), (8, 1024))  # (M, K)
    catalogues: tuple = (10_000, 31_623, 100_000, 316_228, 1_000_000)
    latency_shape: tuple = (64, 8, 256)  # (d, M, K) of the latency catalogues
    latency_samples: int = 200
    latency_share: float = 0.2  # of the budget, at most latency_cap seconds
    latency_cap: float = 75.0
    budget: float = 240.0
    reserve: float = 5.0  # seconds kept for the tables, files and plot
    valid_users: int = 1000
    lr: float = 5e-3  # high: a short budget
    extra: dict = field(default_factory=dict)  # TrainConfig overrides


DEFAULT = Plan()
QUICK = Plan(users=150, items=120, mean_length=10, max_len=12, dense_dims=(8, 16), pq_dim=16,
             pq_shapes=((2, 16), (4, 16), (4, 64)), catalogues=(1_000, 4_000), latency_shape=(16, 4, 16),
             latency_samples=20, latency_share=0.3, budget=8.0, reserve=1.0, valid_users=100,
             extra=dict(batch_size=32, epochs=2))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def item_bytes(model) -> int:
    """Bytes of the item representation: dense table, or RecJPQ codes + sub-item embeddings."""
    emb = model.item_embedding
    return sum(t.numel() * t.element_size() for t in (*emb.parameters(), *emb.buffers()))


def pareto(points: list[dict]) -> None:
    """Marks ``pareto=True`` on points no other point beats with at most their bytes."""
    best = -1.0
    for p in sorted(points, key=lambda p: (p["item_bytes"], -p["ndcg@10"])):
        p["pareto"] = p["ndcg@10"] > best
        best = max(best, p["ndcg@10"])


def _runs(plan: Plan) -> list[dict]:
    """Dense and RecJPQ configurations, interleaved so that any drift in the schedule hits both."""
    dense = [dict(embedding="dense", dim=d) for d in plan.dense_dims]
    pq = [dict(embedding="recjpq", dim=plan.pq_dim, splits=m, num_codes=k) for m, k in plan.pq_shapes]
    mixed = [run for pair in zip(dense, pq) for run in pair]
    return mixed + dense[len(pq):] + pq[len(dense):]




def _frontier(data: SequenceData, plan: Plan, deadline: float, progress: bool) -> list[dict]:
    """Trains every configuration; each gets an equal share of the time left before ``deadline``,
    less the codes and evaluations measured around the models before it."""
    runs = _runs(plan)
    points, overheads = [], []
    bar = tqdm(runs, desc="frontier", unit="model", disable=None if progress else True)
    for done, run in enumerate(bar):
        name = (f"dense d={run['dim']}" if run["embedding"] == "dense"
                else f"RecJPQ M={run['splits']} K={run['num_codes']}")
        bar.set_postfix_str(name)
        share = (deadline - time.perf_counter()) / (len(runs) - done)
        seconds = max(share - (np.mean(overheads) if overheads else 0.15 * share), 1.0)
        config = TrainConfig(**{**dict(model="sasrec", codes="svd", max_len=plan.max_len, lr=plan.lr, batch_size=128,
                                       epochs=1000, patience=5, valid_users=plan.valid_users,
                                       time_limit=seconds), **plan.extra, **run})
        started = time.perf_counter()
        # these models are too small to gain from more threads, and on a shared CPU spinning OpenMP threads
        # made their evaluation 6x slower (measured at load 17, 2 cores)
        with one_torch_thread():
            result = fit(data, config, progress=False)
        wall = time.perf_counter() - started
        overheads.append(max(wall - result.train_seconds, 0.0))
        points.append({"model": name, "embedding": run["embedding"], "d": run["dim"],
                       "M": run.get("splits"), "K": run.get("num_codes"), "item_bytes": item_bytes(result.model),
                       "ndcg@10": result.test["ndcg@10"], "recall@10": result.test["recall@10"],
                       "epochs": len(result.history), "train_seconds": round(result.train_seconds, 1),
                       "wall_seconds": round(wall, 1)})
        bar.write(f"  {name}: NDCG@10 {result.test['ndcg@10']:.4f} after {len(result.history)} epochs "
                  f"({result.train_seconds:.0f} s of training, {wall:.0f} s in all)")
    pareto(points)
    return points


class BusyCore:
    """A subprocess spinning on one core for the ``with`` block: load that the demo can name."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # let it get scheduled before the first sample
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _samples_ms(methods: dict, count: int, seconds: float) -> dict:
    """Per-call milliseconds of each method, called in turn ``count`` times (fewer, at least 10,
    if ``seconds`` run out), so that a burst of load on the machine hits every method alike."""
    for fn in methods.values():
        for _ in range(3):
            fn()  # warm-up: prepared code layouts, allocator, lazy imports
    out = {name: [] for name in methods}
    deadline = time.perf_counter() + seconds
    for done in range(count):
        if done >= 10 and time.perf_counter() > deadline:
            break
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return {name: 1e3 * np.asarray(times) for name, times in out.items()}


def _methods(num_items: int, shape: tuple) -> dict:
    """The top-k calls to time over one random catalogue: recjpq, dense, FAISS (if installed)."""
    dim, splits, num_codes = shape
    g = torch.Generator().manual_seed(num_items)
    query = torch.randn(1, dim, generator=g)
    codes = torch.randint(0, num_codes, (num_items, splits), generator=g).to(codes_dtype(num_codes))
    centroids = torch.randn(splits, num_codes, dim // splits, generator=g)
    items = torch.randn(num_items, dim, generator=g)
    methods = {"recjpq": lambda: ops.pq_topk_query(query, centroids, codes, K),
               "dense": lambda: torch.topk(query @ items.t(), K, dim=1)}
    try:
        import faiss
    except ImportError:
        return methods
    if num_codes == 256:
        from recjpq.interop import to_faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index, q = to_faiss((codes, centroids)), query.numpy()
        methods["faiss IndexPQ"] = lambda: index.search(q, K)
    return methods


def _latency(plan: Plan, seconds: float, progress: bool) -> list[dict]:
    per_catalogue = seconds / (2 * len(plan.catalogues))  # idle and busy
    rows = {}
    bar = tqdm(total=2 * len(plan.catalogues), desc="latency", unit="catalogue", disable=None if progress else True)
    for load in ("idle", "busy"):
        for n in plan.catalogues:
            bar.set_postfix_str(f"{load}, {n:,} items")
            with torch.no_grad():
                methods = _methods(n, plan.latency_shape)
                with BusyCore() if load == "busy" else contextlib.nullcontext():
                    samples = _samples_ms(methods, plan.latency_samples, per_catalogue)
            for name, ms in samples.items():
                row = rows.setdefault((n, name), {"items": n, "method": name})
                row.update({f"{load}_p50_ms": round(float(np.percentile(ms, 50)), 3),
                            f"{load}_p99_ms": round(float(np.percentile(ms, 99)), 3),
                            f"{load}_samples": len(ms)})
            bar.update(1)
            del methods
    bar.close()
    return list(rows.values())


def _kb(n: float) -> str:
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} KB"


def summary_lines(points: list[dict], latency: list[dict]) -> list[str]:
    """The answer in words: the best of each kind, RecJPQ against dense at equal memory, latency."""
    dense = [p for p in points if p["embedding"] == "dense"]
    pq = [p for p in points if p["embedding"] == "recjpq"]
    lines = []
    best_dense = max(dense, key=lambda p: p["ndcg@10"])
    for p in sorted(pq, key=lambda p: p["item_bytes"]):
        rival = [q for q in dense if q["item_bytes"] >= p["item_bytes"]]
        closest = min(rival, key=lambda q: q["item_bytes"]) if rival else None
        text = (f"{p['model']} ({_kb(p['item_bytes'])}): NDCG@10 {p['ndcg@10']:.4f}, "
                f"{(p['ndcg@10'] / best_dense['ndcg@10'] - 1) * 100:+.0f}% vs the best dense "
                f"({best_dense['model']}, {best_dense['item_bytes'] / p['item_bytes']:.1f}x its memory)")
        if closest is not None:
            text += (f"; {(p['ndcg@10'] / closest['ndcg@10'] - 1) * 100:+.0f}% vs {closest['model']}, the smallest "
                     f"dense table at least as large ({_kb(closest['item_bytes'])})")
        lines.append(text)
    front = [p["model"] for p in sorted(points, key=lambda p: p["item_bytes"]) if p["pareto"]]
    lines.append("Pareto front (more memory buys more quality along it): " + " -> ".join(front))
    by = {(r["items"], r["method"]): r for r in latency}
    sizes = sorted({r["items"] for r in latency})
    for load in ("idle", "busy"):
        faster = [n for n in sizes if by[(n, "recjpq")][f"{load}_p50_ms"] < by[(n, "dense")][f"{load}_p50_ms"]]
        big = sizes[-1]
        ratio = by[(big, "dense")][f"{load}_p50_ms"] / by[(big, "recjpq")][f"{load}_p50_ms"]
        where = (f"from {faster[0]:,} items on" if faster and faster == sizes[sizes.index(faster[0]):]
                 else f"at {', '.join(f'{n:,}' for n in faster) or 'no size tried'}")
        lines.append(f"Latency, {load}: recjpq p50 beats dense {where}; at {big:,} items p50 "
                     f"{by[(big, 'recjpq')][f'{load}_p50_ms']:.2f} ms vs {by[(big, 'dense')][f'{load}_p50_ms']:.2f} ms "
                     f"({ratio:.1f}x), p99 {by[(big, 'recjpq')][f'{load}_p99_ms']:.2f} ms vs "
                     f"{by[(big, 'dense')][f'{load}_p99_ms']:.2f} ms")
    return lines


def tables(points: list[dict], latency: list[dict], shape: tuple) -> str:
    lines = ["| model | item bytes | NDCG@10 | Recall@10 | epochs | train s | Pareto |", "|---|---:|---:|---:|---:|---:|:-:|"]
    for p in sorted(points, key=lambda p: p["item_bytes"]):
        lines.append(f"| {p['model']} | {_kb(p['item_bytes'])} | {p['ndcg@10']:.4f} | {p['recall@10']:.4f} | "
                     f"{p['epochs']} | {p['train_seconds']} | {'*' if p['pareto'] else ''} |")
    d, m, k = shape
    lines += ["", f"Top-{K} latency for one query, ms (random catalogue, d={d}, M={m}, K={k}; "
                  f"{torch.get_num_threads()} torch threads):", "",
              "| items | method | idle p50 | idle p99 | busy core p50 | busy core p99 |", "|---:|---|---:|---:|---:|---:|"]
    for r in latency:
        lines.append(f"| {r['items']:,} | {r['method']} | {r['idle_p50_ms']:.3f} | {r['idle_p99_ms']:.3f} | "
                     f"{r['busy_p50_ms']:.3f} | {r['busy_p99_ms']:.3f} |")
    return "\n".join(lines)


def plot(path: str, points: list[dict], latency: list[dict], title: str, shape: tuple, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = plt.figure(figsize=(15, 5))
    grid = fig.add_gridspec(1, 3, width_ratios=(1.3, 1, 1))
    left = fig.add_subplot(grid[0])
    idle = fig.add_subplot(grid[1])
    busy = fig.add_subplot(grid[2], sharey=idle)
    styles = {"dense": dict(marker="o", color="#4c72b0")}
    ks = sorted({p["K"] for p in points if p["K"]})
    for k, colour in zip(ks, ("#dd8452", "#c44e52", "#8172b3", "#937860")):
        styles[k] = dict(marker="s", color=colour)
    for key, label in [("dense", "dense SASRec (label: d)")] + [(k, f"RecJPQ K={k} (label: M)") for k in ks]:
        group = [p for p in points if (p["embedding"] == "dense" if key == "dense" else p["K"] == key)]
        left.scatter([p["item_bytes"] for p in group], [p["ndcg@10"] for p in group], s=55, label=label, zorder=3,
                     **styles[key])
        for p in group:
            left.annotate(f"d={p['d']}" if key == "dense" else f"M={p['M']}", (p["item_bytes"], p["ndcg@10"]),
                          textcoords="offset points", xytext=(6, -3), fontsize=8)
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["item_bytes"])
    left.step([p["item_bytes"] for p in front], [p["ndcg@10"] for p in front], where="post", color="0.3",
              linestyle="--", linewidth=1, zorder=2)
    left.scatter([p["item_bytes"] for p in front], [p["ndcg@10"] for p in front], s=170, facecolors="none",
                 edgecolors="0.3", linewidths=1.2, label="Pareto front", zorder=4)
    left.set_xscale("log")
    left.margins(x=0.12)
    left.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    left.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _kb(x)))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("item representation (bytes, log scale)")
    left.set_ylabel(f"NDCG@{K} (test, full ranking)")
    left.set_title(f"Quality vs memory: {title}", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="best")
    colours = {"recjpq": "#dd8452", "dense": "#4c72b0", "faiss IndexPQ": "#55a868"}
    names = {"recjpq": "recjpq (default path)", "dense": "dense matmul + topk", "faiss IndexPQ": "FAISS IndexPQ"}
    for ax, load in ((idle, "idle"), (busy, "busy")):
        for method in dict.fromkeys(r["method"] for r in latency):
            rows = sorted((r for r in latency if r["method"] == method), key=lambda r: r["items"])
            x = [r["items"] for r in rows]
            ax.plot(x, [r[f"{load}_p50_ms"] for r in rows], "o-", color=colours[method], label=f"{names[method]} p50")
            ax.plot(x, [r[f"{load}_p99_ms"] for r in rows], "v:", color=colours[method], alpha=0.8,
                    label=f"{names[method]} p99")
            ax.fill_between(x, [r[f"{load}_p50_ms"] for r in rows], [r[f"{load}_p99_ms"] for r in rows],
                            color=colours[method], alpha=0.12)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["items"] for r in latency}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:.0f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("catalogue size (items)")
        ax.grid(True, which="both", alpha=0.3)
    d, m, k = shape
    idle.set_ylabel(f"ms per query (top-{K}, batch 1)")
    idle.set_title(f"Latency, machine as is (d={d}, M={m}, K={k}, {threads} threads)", fontsize=10)
    busy.set_title("Latency, one core kept busy", fontsize=10)
    idle.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str = "demo_out", *, quick: bool = False, data_path: str | None = None,
             data_format: str = "auto", budget: float | None = None, progress: bool = True) -> dict:
    """The whole report; ``budget`` (seconds) bounds training plus latency, the plan's by default."""
    plan = QUICK if quick else DEFAULT
    budget = plan.budget if budget is None else budget
    if budget <= 0:
        raise ValueError(f"budget must be positive seconds, got {budget}")
    started = time.perf_counter()
    no_plot = _matplotlib_missing()
    if no_plot:
        print(f"matplotlib is not installed: writing the tables, demo.md and demo.json, not demo.png ({PLOT_HINT})")
    os.makedirs(out_dir, exist_ok=True)
    if data_path is None:
        data = generate_sequences(plan.users, plan.items, mean_length=plan.mean_length, seed=0)
        title = f"synthetic ({plan.users:,} users, {plan.items:,} items)"
    else:
        data = load_interactions(data_path, data_format)
        title = f"{os.path.basename(data_path)} ({len(data.sequences):,} users, {data.num_items:,} items)"
    stats = sequence_statistics(data.sequences, data.num_items)
    backend = backends.resolve(None, torch.device("cpu"), "pq_topk")
    print(f"data: {title}, {data.num_interactions:,} interactions; median history {stats['length_median']:.0f}, "
          f"top 10% of items {stats['top10%_share']:.0%} of interactions; pq_topk backend {backend}, "
          f"{torch.get_num_threads()} torch threads, load average {_load_average()}")
    latency_seconds = min(plan.latency_cap, plan.latency_share * budget)
    print(f"latency first (about {latency_seconds:.0f} s), then {len(_runs(plan))} SASRec models sharing what is left "
          f"of the {budget:.0f} s budget")
    latency = _latency(plan, latency_seconds, progress)
    points = _frontier(data, plan, started + budget - plan.reserve, progress)
    table = tables(points, latency, plan.latency_shape)
    words = summary_lines(points, latency)
    load = _load_average()
    if load is not None and load >= (os.cpu_count() or 1):
        words.append(f"The machine was busy (load average {load} on {os.cpu_count()} cores): the timings include "
                     "waiting for a core, and the models trained for fewer epochs than they would on an idle one")
    print(table + "\n\n" + "\n".join(f"- {w}" for w in words))
    summary = {"data": {"source": data_path or "synthetic", "title": title, **stats}, "frontier": points,
               "latency": latency, "summary": words, "pq_topk_backend": backend,
               "plan": {**asdict(plan), "budget": budget},
               "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "load_average_at_end": _load_average()},
               "seconds": round(time.perf_counter() - started, 1)}
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "demo.md"), "w") as f:
        f.write(f"Data: {title}; budget {budget:.0f} s.\n\n{table}\n\n"
                + "\n".join(f"- {w}" for w in words) + "\n")
    written = ["demo.md", "demo.json"]
    if not no_plot:
        plot(os.path.join(out_dir, "demo.png"), points, latency, title, plan.latency_shape, torch.get_num_threads())
        written.insert(0, "demo.png")
    print(f"wrote {', '.join(os.path.join(out_dir, w) for w in written)} in {summary['seconds']} s"
          + (f" (for the plot: {PLOT_HINT})" if no_plot else ""))
    return summary
