"""Worked example: a trained dense SASRec -> PQ item table at several M, without retraining.

For each M: NDCG@10 (full ranking, test split) before conversion, right after
``recjpq.patch.patch_item_scoring`` and after a short ``recjpq.convert.finetune`` of the sub-item
embeddings (codes fixed, rest of the model frozen); item-table memory; inference time (sequence
encoder + top-10 over the catalogue, and the top-10 step alone) at B = 1 and 256, the dense and
the converted model timed in turns in the same run. Writes one JSON (see docs/convert.md for the commands).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.convert_bench import load_dense  # noqa: E402
from bench.peers import machine  # noqa: E402
from recjpq.convert import finetune  # noqa: E402
from recjpq.data import batches, pad_left  # noqa: E402
from recjpq.evaluation import evaluate  # noqa: E402
from recjpq.patch import patch_item_scoring  # noqa: E402
from recjpq.training import TrainConfig, training_loss  # noqa: E402


def table_bytes(model) -> int:
    """Bytes of the item table as stored: dense weight, or codes + sub-item embeddings."""
    return sum(t.numel() * t.element_size() for t in model.item_embedding.state_dict().values())


@torch.no_grad()
def relative_error(dense, model) -> float:
    """``||decoded - dense||^2 / ||dense||^2`` over the real items (padding row left out)."""
    weight = dense.item_embedding.weight[1:]
    return float((model.item_embedding.weight[1:] - weight).square().sum() / weight.square().sum())


@torch.no_grad()
def paired_inference_ms(models: dict, seqs: dict[int, torch.Tensor], repeats: int) -> dict:
    """Median ms per model of ``query`` + top-10 (end to end) and of the top-10 step alone, per
    batch size. The models take turns inside every repeat, so load from other processes on a
    shared machine hits them alike and the ratios stay fair."""
    times = {(name, batch, step): [] for name in models for batch in seqs for step in ("end_to_end", "topk")}
    for model in models.values():
        model.eval()
    states = {(name, b): model.query(x) for name, model in models.items() for b, x in seqs.items()}
    for rep in range(repeats + 1):  # the first round warms up (allocations, prepared code layouts)
        for batch, x in seqs.items():
            for name, model in models.items():
                for step, fn in (("end_to_end", lambda: model.scorer.topk(model.query(x), 10)),
                                 ("topk", lambda: model.scorer.topk(states[name, batch], 10))):
                    start = time.perf_counter()
                    fn()
                    if rep:
                        times[name, batch, step].append(time.perf_counter() - start)
    return {name: {f"b{batch}_{step}_ms": 1e3 * statistics.median(times[name, batch, step])
                   for batch in seqs for step in ("end_to_end", "topk")} for name in models}


def make_loss_fn(model, train: list[np.ndarray], batch_size: int, seed: int):
    """``loss_fn()`` for ``finetune``: the model's own CE loss on the next training batch."""
    config = TrainConfig(loss="ce", batch_size=batch_size, seed=seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    width = model.config["max_len"] + 1
    order = iter(())

    def loss_fn() -> torch.Tensor:
        nonlocal order
        idx = next(order, None)
        if idx is None:
            order = iter(list(batches(len(train), batch_size, rng)))
            idx = next(order)
        return training_loss(model, pad_left([train[j] for j in idx], width), config, rng, generator)

    return loss_fn


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="../shared/data/ml-1m/ml-1m.txt")
    p.add_argument("--checkpoint", required=True, help="dense model.pt written by `python -m recjpq train`")
    p.add_argument("--splits", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--method", default="kmeans", choices=("kmeans", "svd"))
    p.add_argument("--rotate", action="store_true", help="learn an OPQ rotation before quantising")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/convert_ml1m.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense, _, split = load_dense(args.checkpoint, args.data)
    train = [s for s in split.train if len(s) >= 2]
    histories = split.test.histories
    seqs = {b: pad_left(histories[:b], dense.config["max_len"]) for b in (1, 256)}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = []
    before = evaluate(dense, split.test)
    base = {"ndcg@10": before["ndcg@10"], "recall@10": before["recall@10"], "item_table_bytes": table_bytes(dense)}
    log(f"dense: {base}")
    for m in args.splits:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        patch_item_scoring(model, m, method=args.method, rotate=args.rotate, seed=args.seed)
        convert_s = time.perf_counter() - start
        after = evaluate(model, split.test)
        timed = paired_inference_ms({"dense": dense, "pq": model}, seqs, args.repeats)
        row = {"M": m, "convert_seconds": round(convert_s, 2), "ndcg@10_before": before["ndcg@10"],
               "ndcg@10_after": after["ndcg@10"], "recall@10_after": after["recall@10"],
               "relative_reconstruction_error": relative_error(dense, model),
               "item_table_bytes": table_bytes(model), "dense_timing": timed["dense"], **timed["pq"]}
        model.train()
        start = time.perf_counter()
        losses = finetune(model.item_embedding, make_loss_fn(model, train, args.batch_size, args.seed),
                          args.finetune_steps, lr=args.finetune_lr)
        tuned = evaluate(model, split.test)
        row.update({"finetune_steps": args.finetune_steps, "finetune_seconds": round(time.perf_counter() - start, 2),
                    "finetune_loss_first_last": [losses[0], losses[-1]], "ndcg@10_finetuned": tuned["ndcg@10"],
                    "recall@10_finetuned": tuned["recall@10"]})
        for key in [k for k in row if k.endswith("_ms")]:
            row[key.replace("_ms", "_speedup_vs_dense")] = round(timed["dense"][key] / row[key], 3)
        row["memory_ratio_vs_dense"] = round(base["item_table_bytes"] / row["item_table_bytes"], 2)
        log(f"M={m}: {row}")
        rows.append(row)

    result = {"benchmark": "convert a trained dense SASRec to PQ (ML-1M)", "machine": machine(),
              "command": " ".join(["python", "scripts/convert_ml1m.py"] + (argv if argv is not None else sys.argv[1:])),
              "checkpoint_config": dense.config, "num_items": dense.num_items, "test_users": len(split.test),
              "method": args.method, "rotate": args.rotate, "threads": args.threads, "repeats": args.repeats,
              "dense": base, "converted": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
