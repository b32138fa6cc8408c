"""Markdown table of NDCG@10 / Recall@10, item-embedding parameters and training time from the
``metrics.json`` files that ``scripts/run_table.sh`` writes (one folder per model-variant).

The last column is the validation NDCG@10 curve (epoch:value, on the validation users used for
early stopping), which compares runs at equal epochs when their budgets differ."""
import json
import os
import sys

ORDER = [f"{m}-{v}" for m in ("sasrec", "bert4rec", "gru4rec")
         for v in ("dense", "recjpq-svd", "recjpq-random", "recjpq-baco")]


def main(root: str) -> None:
    runs = {name: json.load(open(os.path.join(root, name, "metrics.json")))
            for name in ORDER if os.path.isfile(os.path.join(root, name, "metrics.json"))}
    print("| model | item embedding | NDCG@10 | Recall@10 | vs dense (NDCG) | item-emb params | train s "
          "| epochs (best) | validation NDCG@10 by epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        model, variant = name.split("-", 1)
        if name not in runs and variant == "recjpq-baco":
            continue  # optional variant (issue 7's comparison), listed only when run
        if name not in runs:
            print(f"| {model} | {variant} | not run | | | | | | |")
            continue
        r = runs[name]
        dense = runs.get(f"{model}-dense")
        rel = f"{100 * (r['ndcg@10'] / dense['ndcg@10'] - 1):+.1f}%" if dense and variant != "dense" else ""
        curve = " ".join(f"{h['epoch']}:{h['ndcg@10']:.3f}" for h in r["history"] if "ndcg@10" in h)
        print(f"| {model} | {variant} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {rel} | "
              f"{r['item_embedding_params']:,} | {r['train_seconds']:.0f} | {len(r['history'])} ({r['best_epoch']}) "
              f"| {curve} |")


if __name__ == "__main__":
    main(sys.argv[1])
