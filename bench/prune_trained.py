"""Pruned vs exhaustive CPU top-k on sub-item score tables from a trained RecJPQ model.

    python bench/prune_trained.py CKPT --data /path/to/ml-1m.txt

Queries are the model's sequence embeddings of the test users (leave-one-out), so S has the
shape trained models give it, not the flat shape of random tables. Both algorithms are exact:
the script checks they return identical results, then times them in one run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import median_ms  # noqa: E402
from bench.peers import machine  # noqa: E402
from recjpq import ops  # noqa: E402
from recjpq.checkpoint import load_checkpoint  # noqa: E402
from recjpq.data import leave_one_out, load_interactions, pad_left  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--users", type=int, default=256, help="test users whose S tables are used")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prune_trained.json")
    args = p.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint)
    emb = model.item_embedding
    if not hasattr(emb, "subitem_embeddings"):
        sys.exit("the checkpoint's item embedding is dense: pruning needs a RecJPQ model")
    split = leave_one_out(load_interactions(args.data).sequences)
    histories = split.test.histories[:args.users]
    with torch.no_grad():
        S = emb.subitem_scores(model.query(pad_left(histories, model.config["max_len"])))
    rows = []
    for batch in (1, 64):
        groups = [S[i:i + batch].contiguous() for i in range(0, S.shape[0] - batch + 1, batch)]
        for g in groups:  # both algorithms are exact: they must agree
            a = ops.pq_topk(g, emb.codes, args.k, backend="cpu", algorithm="exhaustive")
            b = ops.pq_topk(g, emb.codes, args.k, backend="cpu", algorithm="prune")
            assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
        timing = {alg: median_ms(lambda alg=alg: [ops.pq_topk(g, emb.codes, args.k, backend="cpu", algorithm=alg)
                                                  for g in groups], args.repeat) / len(groups)
                  for alg in ("exhaustive", "prune")}
        rows.append({"batch": batch, "ms_per_call": timing, "prune_speedup": timing["exhaustive"] / timing["prune"]})
        print(f"B={batch}: exhaustive {timing['exhaustive']:.3f} ms, prune {timing['prune']:.3f} ms, "
              f"speed-up {rows[-1]['prune_speedup']:.2f}x")
    result = {"checkpoint": args.checkpoint, "items": int(emb.codes.shape[0]), "splits": int(emb.codes.shape[1]),
              "k": args.k, "users": len(histories), "rows": rows, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
