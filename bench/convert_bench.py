"""Conversion benchmark: a trained dense model -> PQ item table with ``recjpq.convert.distill``.

For each M: full-ranking NDCG@10 / Recall@10 on the whole test split right after quantisation
(step 0) and then every ``--eval-every`` fine-tuning steps until ``--time-limit`` seconds of
conversion (quantisation included, evaluations not counted; CPU seconds of this process by
default, see ``--clock``): the quality-vs-time curve. Also the
item-table bytes (dense fp32 weight vs codes + sub-item embeddings), the conversion's wall and
CPU seconds and the load average. Writes one JSON; docs/convert.md has the commands and table.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.peers import machine  # noqa: E402
from recjpq.checkpoint import load_checkpoint  # noqa: E402
from recjpq.convert import distill, query_metric, training_queries  # noqa: E402
from recjpq.data import leave_one_out, load_interactions, pad_left  # noqa: E402
from recjpq.evaluation import evaluate  # noqa: E402
from recjpq.patch import patch_item_scoring  # noqa: E402

# --compare-quantizers: the initial tables distill can start from
QUANTIZERS = {"k-means": {}, "OPQ": {"rotate": True}, "query metric": {"metric": True},
              "query metric + OPQ": {"metric": True, "rotate": True}}


def table_bytes(model) -> int:
    """Bytes of the item table as stored: dense weight, or codes + sub-item embeddings (+ rotation)."""
    return sum(t.numel() * t.element_size() for t in model.item_embedding.state_dict().values())


def load_dense(checkpoint: str, data_path: str):
    """``(dense model, checkpoint meta, leave-one-out split)``; exits if the data's item ids are not
    the checkpoint's."""
    dense, meta = load_checkpoint(checkpoint)
    data = load_interactions(data_path)
    if list(meta.get("item_ids", data.item_ids)) != list(data.item_ids):
        raise SystemExit(f"{data_path} maps item ids differently from the checkpoint's training data")
    return dense, meta, leave_one_out(data.sequences)


def settings_label(settings: dict) -> str:
    """What a run changed from the defaults, for the table: history protocol, OPQ, encoder, alpha."""
    parts = ["history excluded" if settings.get("exclude_seen") else "history ranked"]
    if settings.get("metric"):
        parts.append("query metric")
    if settings.get("rotate"):
        parts.append("OPQ")
    if settings.get("lr", 2e-3) != 2e-3:
        parts.append(f"lr {settings['lr']:g}")
    if settings.get("train_encoder"):
        parts.append(f"encoder lr {settings['encoder_lr']:g}")
    if settings.get("reassign_every"):
        parts.append(f"codes reassigned every {settings['reassign_every']} steps")
    if settings.get("seed", 0):
        parts.append(f"seed {settings['seed']}")
    if settings.get("alpha", 0.5) != 0.5:
        parts.append(f"alpha {settings['alpha']:g}")
    return ", ".join(parts)


def markdown_table(paths: list[str]) -> str:
    """The docs table from result JSONs: one row per (data, M), a run still in progress included."""
    lines = ["| data | settings | M | NDCG@10 dense / quantised / distilled | vs dense | Recall@10 dense / quantised / distilled "
             "| first within 2% of dense NDCG@10 (CPU s) | conversion CPU s (steps) | item table bytes dense -> PQ |",
             "|---|---|---|---|---|---|---|---|---|"]
    curve_lines = ["", "Quality against conversion time (CPU s: NDCG@10):", ""]
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        dense = report["dense"]
        runs = [(row, "") for row in report["converted"]]
        if report.get("in_progress"):
            runs.append((report["in_progress"], " (stopped early)"))
        for row, note in runs:
            curve, final = row["curve"], row["curve"][-1]
            near = next((p["seconds"] for p in curve if p["ndcg@10"] >= 0.98 * dense["ndcg@10"]), None)
            lines.append(
                f"| {os.path.basename(os.path.dirname(report['data']))} | {settings_label(report['settings'])} | {row['M']} | {dense['ndcg@10']:.4f} / {curve[0]['ndcg@10']:.4f} / "
                f"{final['ndcg@10']:.4f} | {final['ndcg@10'] / dense['ndcg@10'] - 1:+.1%} | {dense['recall@10']:.4f} / "
                f"{curve[0]['recall@10']:.4f} / {final['recall@10']:.4f} | {'not reached' if near is None else f'{near:.0f}'} | "
                f"{final['seconds']:.0f} ({final['step']}){note} | {dense['item_table_bytes']:,} -> "
                f"{row['item_table_bytes']:,} ({dense['item_table_bytes'] / row['item_table_bytes']:.2f}x) |")
            curve_lines.append(f"- {os.path.basename(os.path.dirname(report['data']))} M={row['M']}, "
                               f"{settings_label(report['settings'])} (dense "
                               f"{dense['ndcg@10']:.4f}): " + ", ".join(f"{p['seconds']:.0f}: {p['ndcg@10']:.4f}"
                                                                        for p in curve))
    return "\n".join(lines + curve_lines)


def compare_quantizers(dense, split, splits, args, log) -> list[dict]:
    """Each of ``QUANTIZERS`` at each M, before any training: NDCG@10 / Recall@10, the relative
    reconstruction error ||W_hat - W||^2 / ||W||^2 and the relative score error on the test
    queries (the dense model's states for the test users' histories, the queries the ranking uses),
    sum (q . (w_hat - w))^2 / sum (q . w)^2, real items only."""
    test = functools.partial(evaluate, data=split.test, exclude_seen=args.exclude_seen)
    start = time.process_time()
    metric = query_metric(training_queries(dense, split.train, seed=args.seed))
    metric_seconds = time.process_time() - start
    weight = dense.item_embedding.weight.detach()[1:]
    with torch.no_grad():
        queries = torch.cat([dense.query(pad_left(split.test.histories[i:i + 512], dense.config["max_len"]))
                             for i in range(0, len(split.test), 512)])
    dense_scores = (queries @ weight.T).square().sum()
    rows = []
    for m in splits:
        for name, kw in QUANTIZERS.items():
            model = copy.deepcopy(dense)
            start = time.process_time()
            patch_item_scoring(model, m, args.num_codes, seed=args.seed, rotate=kw.get("rotate", False),
                               metric=metric if kw.get("metric") else None)
            seconds = time.process_time() - start + (metric_seconds if kw.get("metric") else 0.0)
            delta = model.item_embedding.weight.detach()[1:] - weight
            row = {"M": m, "quantizer": name, **test(model), "item_table_bytes": table_bytes(model),
                   "quantize_cpu_seconds": round(seconds, 2),
                   "relative_reconstruction_error": float(delta.square().sum() / weight.square().sum()),
                   "relative_score_error": float((queries @ delta.T).square().sum() / dense_scores)}
            log(str(row))
            rows.append(row)
    return rows


def quantizer_table(report: dict) -> str:
    """The docs table of a --compare-quantizers report."""
    dense = report["dense"]
    lines = [f"| M | initial table | NDCG@10 (dense {dense['ndcg@10']:.4f}) | vs dense | Recall@10 (dense "
             f"{dense['recall@10']:.4f}) | reconstruction error | score error on the test queries | "
             "item table bytes | quantise CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["quantizers"]:
        lines.append(f"| {row['M']} | {row['quantizer']} | {row['ndcg@10']:.4f} | {row['ndcg@10'] / dense['ndcg@10'] - 1:+.1%} | "
                     f"{row['recall@10']:.4f} | {row['relative_reconstruction_error']:.4f} | "
                     f"{row['relative_score_error']:.4f} | {row['item_table_bytes']:,} | {row['quantize_cpu_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print the markdown table of these results")
    p.add_argument("--data")
    p.add_argument("--checkpoint", help="dense model.pt written by `python -m recjpq train`")
    p.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--num-codes", type=int, default=256)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds of conversion per M")
    p.add_argument("--clock", default="cpu", choices=("cpu", "wall"),
                   help="what --time-limit counts: this process's CPU seconds (default: fair on a shared machine) "
                        "or wall seconds")
    p.add_argument("--eval-every", type=int, default=50, help="fine-tuning steps between curve points")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-encoder", action="store_true")
    p.add_argument("--encoder-lr", type=float, default=1e-4)
    p.add_argument("--rotate", action="store_true")
    p.add_argument("--reassign-every", type=int, default=None,
                   help="steps between code reassignments to the trained sub-items (distill's reassign_every)")
    p.add_argument("--metric", choices=("queries",),
                   help="quantise for the teacher's score error on its training queries (distill's metric)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-seen", action="store_true",
                   help="rank only items not in the user's history (the usual full-ranking protocol)")
    p.add_argument("--compare-quantizers", action="store_true",
                   help="no training: the initial tables (k-means, OPQ, query metric, both) at each M")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.table:
        reports = {path: json.load(open(path)) for path in args.table}
        runs = [path for path, report in reports.items() if "quantizers" not in report]
        print("\n\n".join([quantizer_table(r) for r in reports.values() if "quantizers" in r]
                           + ([markdown_table(runs)] if runs else [])))
        return
    if not (args.data and args.checkpoint and args.out):
        p.error("--data, --checkpoint and --out are required (or --table)")
    torch.set_num_threads(args.threads)

    dense, meta, split = load_dense(args.checkpoint, args.data)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    test = functools.partial(evaluate, data=split.test, exclude_seen=args.exclude_seen)
    base = {**test(dense), "item_table_bytes": table_bytes(dense)}
    log(f"dense: {base}")
    report = {"benchmark": "convert a trained dense model to PQ with recjpq.convert.distill",
              "machine": machine(), "data": os.path.abspath(args.data),
              "command": " ".join(["python", "bench/convert_bench.py"] + (argv if argv is not None else sys.argv[1:])),
              "checkpoint_config": dense.config, "checkpoint_metrics": meta.get("metrics"),
              "num_items": dense.num_items, "test_users": len(split.test), "settings": vars(args), "dense": base}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write():
        """The JSON so far (after every curve point, so an interrupted run keeps what it measured)."""
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if args.compare_quantizers:
        report["benchmark"] = "initial PQ tables of a trained dense model, before distillation"
        report["quantizers"] = compare_quantizers(dense, split, args.splits, args, log)
        write()
        log(f"wrote {args.out}")
        return
    rows = report["converted"] = []
    report["in_progress"] = None
    for m in args.splits:
        model = copy.deepcopy(dense)
        curve = []

        def point(step, seconds):
            metrics = test(model)
            curve.append({"step": step, "seconds": round(seconds, 2), **metrics})
            log(f"M={m} step={step} seconds={seconds:.1f} {metrics}")
            report["in_progress"] = {"M": m, "item_table_bytes": table_bytes(model), "curve": curve}
            write()

        load_before, cpu_before, wall_before = os.getloadavg()[0], time.process_time(), time.perf_counter()
        result = distill(model, split.train, m, args.num_codes, time_limit=args.time_limit,
                         batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, temperature=args.temperature,
                         train_encoder=args.train_encoder, encoder_lr=args.encoder_lr, rotate=args.rotate,
                         metric=args.metric, reassign_every=args.reassign_every,
                         seed=args.seed, clock=args.clock, callback=point, callback_every=args.eval_every,
                         progress=False)
        final = curve[-1]
        row = {"M": m, "quantize_seconds": round(result.quantize_seconds, 2),
               "convert_seconds": round(result.seconds, 2), "steps": result.steps,
               "wall_seconds_with_evaluations": round(time.perf_counter() - wall_before, 2),
               "cpu_seconds_with_evaluations": round(time.process_time() - cpu_before, 2),
               "loadavg_1min_start_end": [load_before, os.getloadavg()[0]],
               "ndcg@10_quantized": curve[0]["ndcg@10"], "recall@10_quantized": curve[0]["recall@10"],
               "ndcg@10": final["ndcg@10"], "recall@10": final["recall@10"],
               "ndcg@10_vs_dense": round(final["ndcg@10"] / base["ndcg@10"] - 1, 4),
               "item_table_bytes": table_bytes(model),
               "memory_ratio_vs_dense": round(base["item_table_bytes"] / table_bytes(model), 2),
               "loss_first_last": [result.losses[0], result.losses[-1]] if result.losses else None,
               "codes_reassigned": result.reassigned, "curve": curve}
        log(f"M={m}: { {k: v for k, v in row.items() if k != 'curve'} }")
        rows.append(row)

    report["in_progress"] = None
    write()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
