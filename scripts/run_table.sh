#!/usr/bin/env bash
# Train the three models with dense, RecJPQ-SVD and RecJPQ-random item embeddings on one dataset,
# one run at a time, then print the markdown table (scripts/results_table.py).
#   scripts/run_table.sh DATA_FILE OUT_DIR [extra `recjpq train` args...]
# Env: MODELS (default "sasrec gru4rec bert4rec"), TIME_LIMIT (seconds of training per run, default: none),
#      THREADS (torch threads, default 1: fastest on a shared machine).
set -euo pipefail
data=$1; out=$2; shift 2
models=${MODELS:-sasrec gru4rec bert4rec}
for model in $models; do
  for variant in dense recjpq-svd recjpq-random; do
    dir="$out/$model-$variant"
    if [[ -f "$dir/metrics.json" ]]; then echo "skip $dir (done)"; continue; fi
    case $variant in
      dense) emb=(--embedding dense) ;;
      recjpq-svd) emb=(--embedding recjpq --codes svd) ;;
      recjpq-random) emb=(--embedding recjpq --codes random) ;;
    esac
    echo "== $model $variant"
    nice -n 10 python -m recjpq --threads "${THREADS:-1}" train --data "$data" --model "$model" "${emb[@]}" \
      ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} --out "$dir" --no-progress "$@"
  done
done
python "$(dirname "$0")/results_table.py" "$out"
