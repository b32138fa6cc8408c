#!/usr/bin/env bash
# The project's one-call GPU run, from the repository root on a fresh GPU machine:
#   bash bench/gpu.sh [all|setup|test|bench] [bench/gpu_bench.py arguments...]
#   bash bench/gpu.sh models DATA_FILE [recjpq train arguments...]
# all (default): setup, the whole test suite on the GPU, bench/cuda_checks.sh if present, then
# bench/gpu_bench.py --quick unless arguments are given. Logs and JSON go to ${OUT:-bench/results}.
# Everything fits LIMIT_S seconds (default 570, for a 10-minute slot): the test run gets at most
# TEST_TIMEOUT_S (default 240) and the benchmark starts no new shape past what is left.
# models: the quality tables of docs/models.md on the GPU (scripts/run_table.sh with MODELS and
# VARIANTS); the runs share what is left of LIMIT_S. The data is not redistributable, so it
# travels in the git-ignored .data/ (docs/models.md, "On a GPU"). DEVICE=cpu skips the setup.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"; [ $# -gt 0 ] && shift
LIMIT_S="${LIMIT_S:-570}"
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
export PYTHONUNBUFFERED=1
status=0

setup() {
  if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "== no CUDA torch: installing one (needs a package registry)"
    "$PY" -m pip install --quiet torch || { echo "could not install a CUDA torch"; exit 1; }
  fi
  for mod in triton pytest hypothesis numpy scipy ninja; do
    "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install --quiet "$mod" || echo "warning: $mod missing"
  done
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "recjpq failed to build"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton, recjpq; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(), 'backends on cuda:', recjpq.available_backends('cuda'))"
}

run_tests() {
  echo "== pytest on $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
  timeout "${TEST_TIMEOUT_S:-240}" "$PY" -m pytest -q tests -rs 2>&1 | tee "$OUT/pytest.log" || status=1
  if [ -f bench/cuda_checks.sh ]; then
    echo "== bench/cuda_checks.sh"
    bash bench/cuda_checks.sh 2>&1 | tee "$OUT/cuda_checks.log" || status=1
  fi
}

run_bench() {
  local left=$(( LIMIT_S - SECONDS - 90 ))  # the last shape and the JSON write need headroom
  [ "$left" -lt 30 ] && { echo "no time left for the benchmark"; return; }
  [ $# -eq 0 ] && set -- --quick
  echo "== bench/gpu_bench.py $* (budget ${left}s)"
  "$PY" bench/gpu_bench.py --budget-s "$left" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log" || status=1
}

run_models() {
  local data=${1:?usage: bash bench/gpu.sh models DATA_FILE [recjpq train arguments...]}; shift
  local name; name=$(basename "${data%.*}")
  local runs=${RUNS_DIR:-/tmp/recjpq-runs}/$name
  echo "== training runs on $data, sharing $(( LIMIT_S - SECONDS - 30 ))s"
  PYTHON=$PY THREADS=${THREADS:-8} TIME_BUDGET=$(( LIMIT_S - SECONDS - 30 )) bash scripts/run_table.sh "$data" "$runs" \
    --device "${DEVICE:-cuda}" "$@" 2>&1 | tee "$OUT/models_$name.log" || status=1
  for metrics in "$runs"/*/metrics.json; do
    [ -f "$metrics" ] && cp "$metrics" "$OUT/models_${name}_$(basename "$(dirname "$metrics")").json"
  done
}

case "$STAGE" in
  all) setup; run_tests; run_bench "$@" ;;
  setup) setup ;;
  test) setup; run_tests ;;
  bench) setup; run_bench "$@" ;;
  models) [ "${DEVICE:-cuda}" = cpu ] || setup; run_models "$@" ;;
  *) echo "usage: bash bench/gpu.sh [all|setup|test|bench] [gpu_bench.py args] | models DATA_FILE [train args]"; exit 2 ;;
esac
echo "== done in ${SECONDS}s, status $status"
exit $status
