#!/usr/bin/env bash
# Train the three models with dense, RecJPQ-SVD and RecJPQ-random item embeddings on one dataset,
# one run at a time, then print the markdown table (scripts/results_table.py).
#   scripts/run_table.sh DATA_FILE OUT_DIR [extra `recjpq train` args...]
# Env: MODELS (default "sasrec gru4rec bert4rec"), VARIANTS (default "dense recjpq-svd recjpq-random";
#      recjpq-<strategy> takes any recjpq.codes strategy, e.g. recjpq-baco), TIME_LIMIT (seconds of training per run, default: none),
#      THREADS (torch threads, default 1: fastest on a shared machine),
#      PYTHON (interpreter, default python),
#      TIME_BUDGET (seconds for all the runs still to do: each gets an equal share of what is left,
#      less 45 s for codes, the test evaluation and saving; instead of TIME_LIMIT).
set -euo pipefail
data=$1; out=$2; shift 2
models=${MODELS:-sasrec gru4rec bert4rec}
variants=${VARIANTS:-dense recjpq-svd recjpq-random}
pending=0
for model in $models; do
  for variant in $variants; do [[ -f "$out/$model-$variant/metrics.json" ]] || pending=$((pending + 1)); done
done
for model in $models; do
  for variant in $variants; do
    dir="$out/$model-$variant"
    if [[ -f "$dir/metrics.json" ]]; then echo "skip $dir (done)"; continue; fi
    limit=${TIME_LIMIT:-}
    if [[ -n "${TIME_BUDGET:-}" ]]; then
      limit=$(( (TIME_BUDGET - SECONDS) / pending - 45 ))
      (( limit >= 30 )) || { echo "no time left for the $pending runs still to do" >&2; exit 1; }
    fi
    pending=$((pending - 1))
    case $variant in
      dense) emb=(--embedding dense) ;;
      recjpq-*) emb=(--embedding recjpq --codes "${variant#recjpq-}") ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    echo "== $model $variant"
    nice -n 10 "${PYTHON:-python}" -m recjpq --threads "${THREADS:-1}" train --data "$data" --model "$model" "${emb[@]}" \
      ${limit:+--time-limit "$limit"} --out "$dir" --no-progress "$@"
  done
done
"${PYTHON:-python}" "$(dirname "$0")/results_table.py" "$out"
