#!/usr/bin/env bash
# Train the three models with dense, RecJPQ-SVD and RecJPQ-random item embeddings on one dataset,
# one run at a time, then print the markdown table (scripts/results_table.py).
#   scripts/run_table.sh DATA_FILE OUT_DIR [extra `recjpq train` args...]
# Env: MODELS (default "sasrec gru4rec bert4rec"), VARIANTS (default "dense recjpq-svd recjpq-random";
#      recjpq-<strategy> takes any recjpq.codes strategy, e.g. recjpq-baco), TIME_LIMIT (seconds of training per run, default: none),
#      THREADS (torch threads, default 1: fastest on a shared machine),
#      PYTHON (interpreter, default python).
set -euo pipefail
data=$1; out=$2; shift 2
models=${MODELS:-sasrec gru4rec bert4rec}
for model in $models; do
  for variant in ${VARIANTS:-dense recjpq-svd recjpq-random}; do
    dir="$out/$model-$variant"
    if [[ -f "$dir/metrics.json" ]]; then echo "skip $dir (done)"; continue; fi
    case $variant in
      dense) emb=(--embedding dense) ;;
      recjpq-*) emb=(--embedding recjpq --codes "${variant#recjpq-}") ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    echo "== $model $variant"
    nice -n 10 "${PYTHON:-python}" -m recjpq --threads "${THREADS:-1}" train --data "$data" --model "$model" "${emb[@]}" \
      ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} --out "$dir" --no-progress "$@"
  done
done
"${PYTHON:-python}" "$(dirname "$0")/results_table.py" "$out"
