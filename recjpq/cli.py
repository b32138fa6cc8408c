"""The ``recjpq`` command: train, evaluate, recommend, serve, convert, demo. Run ``recjpq <command> -h``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

import numpy as np
import torch

from recjpq.training import TrainConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from recjpq.data import FORMATS

    p.add_argument("--data", required=True, help="interaction file: 'user item [item ...]' text, or csv/tsv "
                                                 "with user,item,timestamp[,rating] header")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--min-rating", type=float, default=None, help="csv/tsv: keep rows rated at least this")


def _parser() -> argparse.ArgumentParser:
    from recjpq.models import EMBEDDINGS, LOSSES, MODELS

    parser = argparse.ArgumentParser(prog="recjpq", description=__doc__)
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (1 is fastest on a busy machine)")
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    train = sub.add_parser("train", help="train on a leave-one-out split; writes model.pt and metrics.json")
    _add_data_args(train)
    train.add_argument("--model", default=d.model, choices=tuple(MODELS))
    train.add_argument("--embedding", default=d.embedding, choices=EMBEDDINGS)
    train.add_argument("--codes", default=d.codes, help="code strategy, any of recjpq.codes.STRATEGIES")
    train.add_argument("--splits", type=_positive_int, default=d.splits, help="M, sub-ids per item")
    train.add_argument("--num-codes", type=_positive_int, default=d.num_codes, help="K, sub-ids per split")
    train.add_argument("--dim", type=_positive_int, default=d.dim)
    train.add_argument("--layers", dest="num_layers", type=_positive_int, default=None)
    train.add_argument("--heads", dest="num_heads", type=_positive_int, default=None)
    train.add_argument("--dropout", type=float, default=d.dropout)
    train.add_argument("--max-len", type=_positive_int, default=d.max_len)
    train.add_argument("--loss", default=d.loss, choices=LOSSES)
    train.add_argument("--negatives", type=_positive_int, default=d.negatives, help="bce/gbce negatives")
    train.add_argument("--gbce-t", type=float, default=d.gbce_t)
    train.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    train.add_argument("--bucket-by-length", action="store_true",
                       help="batch sequences of similar length (SASRec/BERT4Rec pad each batch to its longest)")
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--epochs", type=_positive_int, default=d.epochs)
    train.add_argument("--patience", type=_positive_int, default=d.patience)
    train.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    train.add_argument("--valid-users", type=_positive_int, default=None, help="validate on the first N users")
    train.add_argument("--exclude-seen", action="store_true", help="rank only items not in the history")
    train.add_argument("--max-steps", type=_positive_int, default=None)
    train.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--device", default=d.device)
    train.add_argument("--backend", default=None, help="recjpq backend for RecJPQ scoring (default: fastest)")
    train.add_argument("--shard-catalogue", action="store_true",
                       help="under torchrun: split the output layer's items over the ranks (recjpq, loss ce)")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines only)")

    ev = sub.add_parser("evaluate", help="full-ranking test metrics of a checkpoint on a dataset")
    ev.add_argument("checkpoint")
    _add_data_args(ev)
    ev.add_argument("-k", nargs="+", type=_positive_int, default=[10])
    ev.add_argument("--exclude-seen", action="store_true")

    rec = sub.add_parser("recommend", help="top-k next items for one history")
    rec.add_argument("checkpoint")
    rec.add_argument("--history", required=True, help="comma-separated raw item ids, oldest first")
    rec.add_argument("-k", type=_positive_int, default=10)
    rec.add_argument("--include-seen", action="store_true", help="allow items already in the history")

    srv = sub.add_parser("serve", help="HTTP inference server with dynamic micro-batching (needs recjpq[serve])")
    srv.add_argument("checkpoint")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=_positive_int, default=64, help="most queries per model forward")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a request waits for batch-mates")
    srv.add_argument("--no-batching", dest="batching", action="store_false", help="run every request alone")
    srv.add_argument("--max-k", type=_positive_int, default=1000)
    srv.add_argument("--max-users", type=_positive_int, default=1024, help="most histories per batch request")
    srv.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20)
    srv.add_argument("--backend", default=None, help="pq_topk backend (default: the fastest available)")
    srv.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds in-flight requests get on exit")
    srv.add_argument("--log-level", default="info")

    conv = sub.add_parser("convert", help="dense checkpoint -> PQ item table, fine-tuned with the dense model as "
                                          "teacher (recjpq.convert.distill); writes model.pt and metrics.json")
    conv.add_argument("checkpoint", help="a dense model.pt written by `recjpq train`")
    _add_data_args(conv)
    conv.add_argument("--splits", type=_positive_int, required=True, help="M, sub-ids per item (must divide d)")
    conv.add_argument("--num-codes", type=_positive_int, default=256, help="K, sub-ids per split")
    conv.add_argument("--method", default="kmeans", choices=("kmeans", "svd"), help="initial codes")
    conv.add_argument("--rotate", action="store_true", help="learn an OPQ rotation before quantising")
    conv.add_argument("--metric", choices=("queries",), default=None,
                      help="quantise for the score error on the dense model's own training queries "
                           "(best with --rotate; see docs/convert.md)")
    conv.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole conversion")
    conv.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                      help="what --time-limit counts (cpu: this process's CPU seconds, for shared machines)")
    conv.add_argument("--steps", type=_positive_int, default=None, help="stop after this many fine-tuning steps")
    conv.add_argument("--batch-size", type=_positive_int, default=128, help="training sequences per step")
    conv.add_argument("--lr", type=float, default=2e-3, help="sub-item embeddings' learning rate")
    conv.add_argument("--alpha", type=float, default=0.5, help="weight of distillation vs the task's CE loss")
    conv.add_argument("--temperature", type=float, default=1.0)
    conv.add_argument("--train-encoder", action="store_true", help="fine-tune the rest of the model too")
    conv.add_argument("--encoder-lr", type=float, default=1e-4)
    conv.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                      help="skip the full-ranking test metrics before and after")
    conv.add_argument("--exclude-seen", action="store_true", help="evaluate ranking only items not in the history")
    conv.add_argument("--seed", type=int, default=0)
    conv.add_argument("--out", required=True, help="output directory")
    conv.add_argument("--no-progress", action="store_true")

    _add_train_cf_parser(sub)

    from recjpq.data import FORMATS

    demo = sub.add_parser("demo", help="dense vs RecJPQ SASRec: quality-vs-memory frontier and top-k latency "
                                       "across catalogue sizes and load; table, demo.md, demo.json, demo.png")
    demo.add_argument("--data", default=None, help="your interaction file (as for train); default: synthetic data")
    demo.add_argument("--format", default="auto", choices=FORMATS, help="format of --data, as for train")
    demo.add_argument("--budget", type=float, default=None,
                      help="seconds for training all models plus the latency runs (default 240; 8 with --quick)")
    demo.add_argument("--out", default="demo_out", help="where demo.png, demo.md and demo.json go")
    demo.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    return parser


def _add_train_cf_parser(sub) -> None:
    from recjpq.cf.train import EMBEDDINGS, MODELS, SAMPLERS, CFConfig

    d = CFConfig()
    cf = sub.add_parser("train-cf", help="MF-BPR / LightGCN on a LightGCN-style train.txt/test.txt split; "
                                         "full-ranking Recall@20 / NDCG@20; writes metrics.json")
    cf.add_argument("--data", required=True, help="folder with train.txt and test.txt ('user item item ...', 0-based)")
    cf.add_argument("--model", default=d.model, choices=MODELS)
    cf.add_argument("--embedding", default=d.embedding, choices=EMBEDDINGS,
                    help="full tables, BACO-shared rows, hashed rows, low-rank (smaller dim) at --budget, "
                         "or recjpq: product-quantised items (--codes, --splits, --num-codes)")
    cf.add_argument("--budget", type=float, default=d.budget, help="embedding params / those of the full model")
    cf.add_argument("--tables", type=_positive_int, default=d.tables, help="baco/hash: ids (tables) per entity")
    cf.add_argument("--codes", default=d.codes, help="recjpq: item code strategy, any of recjpq.codes.STRATEGIES")
    cf.add_argument("--splits", type=_positive_int, default=d.splits, help="recjpq: sub-ids per item (M)")
    cf.add_argument("--num-codes", type=_positive_int, default=d.num_codes, help="recjpq: sub-ids per split (K)")
    cf.add_argument("--dim", type=_positive_int, default=d.dim)
    cf.add_argument("--layers", type=int, default=d.layers, help="LightGCN propagation layers")
    cf.add_argument("--epochs", type=_positive_int, default=d.epochs)
    cf.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    cf.add_argument("--lr", type=float, default=d.lr)
    cf.add_argument("--l2", type=float, default=d.l2, help="L2 on the batch's ego embeddings (LightGCN's reg)")
    cf.add_argument("--eval-every", type=_positive_int, default=d.eval_every)
    cf.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    cf.add_argument("--seed", type=int, default=d.seed)
    cf.add_argument("--sampler", default=d.sampler, choices=SAMPLERS,
                    help="pairs: every training pair once per epoch; users: users drawn uniformly (LightGCN's code)")
    cf.add_argument("--device", default=d.device, help="where to train and evaluate, e.g. cuda (ids are built on the CPU)")
    cf.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    cf.add_argument("--out", required=True, help="output directory (checkpoint.pt, best.pt, metrics.json)")
    cf.add_argument("--no-progress", action="store_true", help="no progress bars (evaluation lines only)")


def _train_cf(args) -> None:
    from recjpq.cf import CFConfig, fit, load_cf

    config = CFConfig(model=args.model, embedding=args.embedding, budget=args.budget, tables=args.tables,
                      dim=args.dim, layers=args.layers, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      l2=args.l2, eval_every=args.eval_every, time_limit=args.time_limit, seed=args.seed,
                      sampler=args.sampler, device=args.device, codes=args.codes, splits=args.splits,
                      num_codes=args.num_codes)
    data = load_cf(args.data)
    print(f"{args.data}: {data.num_users} users, {data.num_items} items, {data.train_users.size} train pairs, "
          f"{data.test.nnz} test pairs", file=sys.stderr)
    summary = fit(config, data, args.out, progress=not args.no_progress, resume=args.resume,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({k: summary[k] for k in ("best", "embedding_params", "params_vs_full", "epochs_run", "stopped")}))


def _train(args) -> None:
    from recjpq.checkpoint import save_checkpoint
    from recjpq.data import load_interactions
    from recjpq.training import fit

    from recjpq.distributed.training import init_from_env, is_main

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    config.device = init_from_env(config.device)  # under torchrun: join the process group (docs/distributed.md)
    config.validate()
    data = load_interactions(args.data, args.format, min_rating=args.min_rating)
    print(f"{args.data}: {len(data.sequences)} users, {data.num_items} items, {data.num_interactions} interactions",
          file=sys.stderr)
    result = fit(data, config, progress=not args.no_progress, log_epochs=True)
    if not is_main():
        return  # rank 0 writes the checkpoint and metrics
    os.makedirs(args.out, exist_ok=True)
    summary = {**result.summary(), "data": os.path.abspath(args.data)}
    save_checkpoint(os.path.join(args.out, "model.pt"), result.model,
                    {"item_ids": data.item_ids, "metrics": {k: v for k, v in summary.items() if k != "history"}})
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("ndcg@10", "recall@10", "item_embedding_params", "train_seconds")}))


def _raw_item_ids(model, meta: dict) -> list[str]:
    """The checkpoint's raw item ids; the model ids 1..N where it stores none (saved from Python)."""
    return meta.get("item_ids") or [str(i) for i in range(1, model.num_items + 1)]


def _evaluate(args) -> None:
    from recjpq.checkpoint import load_checkpoint
    from recjpq.data import leave_one_out, load_interactions
    from recjpq.evaluation import evaluate

    model, meta = load_checkpoint(args.checkpoint)
    data = load_interactions(args.data, args.format, min_rating=args.min_rating)
    # express the data in the checkpoint's item ids; items it never saw cannot be ranked
    index = {raw: pos + 1 for pos, raw in enumerate(_raw_item_ids(model, meta))}
    sequences = [np.asarray([index.get(data.item_ids[i - 1], 0) for i in seq], dtype=np.int64)
                 for seq in data.sequences]
    unknown = sum(int((s == 0).sum()) for s in sequences)
    if unknown:
        print(f"warning: {unknown} interactions with items unknown to the checkpoint are dropped", file=sys.stderr)
    sequences = [s[s > 0] for s in sequences]
    split = leave_one_out(sequences)
    metrics = evaluate(model, split.test, ks=args.k, exclude_seen=args.exclude_seen)
    print(json.dumps(metrics))


def _recommend(args) -> None:
    from recjpq.checkpoint import load_checkpoint

    model, meta = load_checkpoint(args.checkpoint)
    raw_ids = _raw_item_ids(model, meta)
    index = {raw: pos + 1 for pos, raw in enumerate(raw_ids)}
    history = [h.strip() for h in args.history.split(",") if h.strip()]
    unknown = [h for h in history if h not in index]
    if unknown:
        raise SystemExit(f"recjpq recommend: error: unknown item ids {unknown} (not in the checkpoint's catalogue)")
    scores, items = model.recommend([[index[h] for h in history]], args.k, exclude_seen=not args.include_seen)
    for rank, (item, score) in enumerate(zip(items[0].tolist(), scores[0].tolist()), 1):
        if item > 0:
            print(f"{rank}\t{raw_ids[item - 1]}\t{score:.4f}")


def _serve(args) -> None:
    try:
        from recjpq.serve import serve
    except ImportError as e:
        raise SystemExit(f"recjpq serve needs the serve extra (pip install 'recjpq[serve]'): {e}") from None
    serve(args.checkpoint, host=args.host, port=args.port, backend=args.backend, max_k=args.max_k,
          graceful_timeout_s=args.graceful_timeout, log_level=args.log_level, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, batching=args.batching, max_body_bytes=args.max_body_bytes,
          max_users=args.max_users)


def _convert(args) -> None:
    import time

    from recjpq.checkpoint import load_checkpoint, save_checkpoint
    from recjpq.convert import distill
    from recjpq.data import leave_one_out, load_interactions
    from recjpq.evaluation import evaluate
    from recjpq.patch import save

    model, meta = load_checkpoint(args.checkpoint)
    data = load_interactions(args.data, args.format, min_rating=args.min_rating)
    if list(meta.get("item_ids", data.item_ids)) != list(data.item_ids):
        raise ValueError(f"{args.data} does not have the item catalogue of {args.checkpoint}: convert on the data "
                         "the model was trained on")
    split = leave_one_out(data.sequences)
    scores = {}
    if args.evaluate:
        scores["dense"] = evaluate(model, split.test, exclude_seen=args.exclude_seen)
        print(f"dense: {json.dumps(scores['dense'])}", file=sys.stderr)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.item_embedding.state_dict().values())
    start = time.perf_counter()
    result = distill(model, split.train, args.splits, args.num_codes, time_limit=args.time_limit, clock=args.clock, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, alpha=args.alpha, temperature=args.temperature,
                     train_encoder=args.train_encoder, encoder_lr=args.encoder_lr, seed=args.seed,
                     method=args.method, rotate=args.rotate, metric=args.metric, progress=not args.no_progress)
    summary = {"splits": args.splits, "num_codes": args.num_codes, "steps": result.steps,
               "quantize_seconds": round(result.quantize_seconds, 2), "convert_seconds": round(result.seconds, 2),
               "wall_seconds": round(time.perf_counter() - start, 2), "dense_item_table_bytes": dense_bytes,
               "item_table_bytes": sum(t.numel() * t.element_size() for t in result.embedding.state_dict().values()),
               "final_loss": result.losses[-1] if result.losses else None, "args": vars(args)}
    if args.evaluate:
        scores["converted"] = evaluate(model, split.test, exclude_seen=args.exclude_seen)
    summary.update(scores)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.pt")
    meta = {**meta, "conversion": {k: v for k, v in summary.items() if k != "args"}}
    if args.rotate or args.metric:  # the rotation is not part of a recjpq.models config: recjpq.patch's format keeps it
        save(model, path, meta)
    else:
        save_checkpoint(path, model, meta)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from recjpq.demo import run_demo

        try:
            run_demo(args.out, quick=args.quick, data_path=args.data, data_format=args.format, budget=args.budget)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"recjpq demo: error: {e}") from None
        return
    try:
        {"train": _train, "train-cf": _train_cf, "evaluate": _evaluate, "recommend": _recommend, "serve": _serve,
         "convert": _convert}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"recjpq {args.command}: error: {e}") from None


if __name__ == "__main__":
    main()
