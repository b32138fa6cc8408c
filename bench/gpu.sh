#!/usr/bin/env bash
# The project's GPU run, in stages that each fit one 600 s command (the longest our GPU machines
# take), from the repository root:
#   bash bench/gpu.sh [test]               # setup + the test suite on the GPU (the default)
#   bash bench/gpu.sh sanitizer            # setup + compute-sanitizer memcheck of the CUDA kernels
#   bash bench/gpu.sh bench [gpu_bench.py arguments]   # setup + bench/gpu_bench.py (--quick default)
#   bash bench/gpu.sh dispatch             # setup + bench/cuda_dispatch_table.py (gpu_dispatch.json)
#   bash bench/gpu.sh models DATA_FILE [recjpq train arguments...]   # setup + docs/models.md tables
#   bash bench/gpu.sh session [SECONDS]    # one lease's worth (default 540 s): setup, the GPU test
#                                          # files, memcheck/racecheck/synccheck, the issue's timings
#                                          # and the dispatch table, each step inside what is left
#   bash bench/gpu.sh cf DATA_DIR [SECONDS] # LightGCN on a LightGCN split (docs/baco.md): full, baco,
#                                          # hash and low rank at 25% side by side for SECONDS (default
#                                          # 420) of training each; run again on the warm machine to go on
#                                          # (--resume); meanwhile setup and the CUDA/Triton test files.
#                                          # CF_EMBEDDINGS picks the runs; CKPT_PARTS=1 copies each run's
#                                          # checkpoint and ids to $OUT as a tar in 15 MiB parts, which
#                                          # resume the run on a later machine once put back in its
#                                          # folder as run.tar.part.*
#   bash bench/gpu.sh budgets              # prints every stage's worst case and their sum
# DRY_RUN=1 prints each step and its time limit instead of running it (works without a GPU).
# Worst cases: setup is at most SETUP_S (240 s: pip installs and the CUDA extension build, each
# under a timeout; seconds when the machine is warm), and each stage's own steps have timeouts
# that, with setup and 30 s of slack, add up to at most 570 s. Logs and JSON go to ${OUT:-bench/results}.
# Autotuning: TRITON_CACHE_AUTOTUNING=1 keeps each kernel's chosen config in Triton's cache, so a
# later stage on the same warm machine neither recompiles nor re-benchmarks; the tests use few
# shapes (tests/test_triton_backend.py) so autotuning compiles few kernels.
# models: the quality tables of docs/models.md (scripts/run_table.sh with MODELS and VARIANTS);
# the data is not redistributable, so it travels in the git-ignored .data/ (docs/models.md, "On a
# GPU"). DEVICE=cpu skips the setup.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-test}"; [ $# -gt 0 ] && shift
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
SETUP_S=240 SLACK_S=30
TEST_S=300 SANITIZER_S=300 BENCH_S=280 DISPATCH_S=280 MODELS_S=300
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
status=0
RAN=() SKIPPED=()

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout LIMIT_S` (or prints it with DRY_RUN=1).
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*"
  if [ "$DRY_RUN" = 1 ]; then RAN+=("$name (dry run)"); return 0; fi
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  RAN+=("$name: exit $rc in $((SECONDS - start))s")
  [ $rc -eq 0 ] || status=1
  return $rc
}

skip() { echo "== skipped: $*"; SKIPPED+=("$*"); }

setup() {
  [ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
  local start=$SECONDS
  if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "no CUDA torch here: install one first (README, 'GPU')"; exit 1
  fi
  local missing=()
  for mod in triton pytest hypothesis numpy scipy ninja; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "pip install ${missing[*]}" 60 "$PY" -m pip install --quiet "${missing[@]}"
  else
    skip "pip install (every test dependency present)"
  fi
  if "$PY" -c "import recjpq._C_cuda" 2>/dev/null; then
    skip "building recjpq (installed, with its CUDA extension)"
  else
    step "pip install -e . (C++ and CUDA extensions)" $((SETUP_S - 60 - (SECONDS - start))) \
      "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "recjpq failed to build"; exit 1; }
  fi
  [ "$DRY_RUN" = 1 ] && return
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -c "import torch, triton, recjpq; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(), 'backends on cuda:', recjpq.available_backends('cuda'))"
}

run_tests() {
  step "pytest tests on the GPU" "$TEST_S" "$PY" -m pytest -q -rs -x tests -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml"
}

run_sanitizer() {
  local sanitizer
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  if [ -z "$sanitizer" ] && [ "$DRY_RUN" != 1 ]; then
    skip "memcheck: compute-sanitizer not found"; status=1; return
  fi
  # small shapes only: the full-scale and fuzz tests are slow under the sanitizer
  step "compute-sanitizer memcheck of tests/test_cuda_backend.py" "$SANITIZER_S" \
    "${sanitizer:-compute-sanitizer}" --tool memcheck --error-exitcode 3 --leak-check no \
    "$PY" -m pytest -q -x tests/test_cuda_backend.py -p no:cacheprovider -k "not full_scale and not fuzz and not emulated"
  skip "racecheck/synccheck (not budgeted in this stage)"
}

run_bench() {
  [ $# -eq 0 ] && set -- --quick
  # the benchmark starts no new shape past its budget; 40 s cover the last shape and the JSON
  step "bench/gpu_bench.py $*" "$BENCH_S" "$PY" bench/gpu_bench.py --budget-s $((BENCH_S - 40)) --out "$OUT" "$@"
}

run_dispatch() {
  step "bench/cuda_dispatch_table.py --quick" "$DISPATCH_S" \
    "$PY" bench/cuda_dispatch_table.py --quick --budget-s $((DISPATCH_S - 40))
  [ "$DRY_RUN" = 1 ] || cp recjpq/backends/gpu_dispatch.json "$OUT/" 2>/dev/null
}

run_models() {
  local data=${1:?usage: bash bench/gpu.sh models DATA_FILE [recjpq train arguments...]}; shift
  local name; name=$(basename "${data%.*}")
  local runs=${RUNS_DIR:-/tmp/recjpq-runs}/$name
  PYTHON=$PY THREADS=${THREADS:-8} TIME_BUDGET=$((MODELS_S - 30)) \
    step "scripts/run_table.sh $data (sharing $((MODELS_S - 30))s)" "$MODELS_S" \
    bash scripts/run_table.sh "$data" "$runs" --device "${DEVICE:-cuda}" "$@"
  for metrics in "$runs"/*/metrics.json; do
    [ -f "$metrics" ] && cp "$metrics" "$OUT/models_${name}_$(basename "$(dirname "$metrics")").json"
  done
}

# the test files that touch the GPU (the rest of the suite is CPU-only and runs in CI)
GPU_TESTS=(tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_triton_decode.py
           tests/test_pq_cross_entropy.py tests/test_validation.py tests/test_dispatch.py)
SANITIZER_K="matches_reference or exclusions_and_short_tails or rejects_bad_plans"

# left DEADLINE RESERVE: seconds until DEADLINE (a $SECONDS value) minus RESERVE, at least 1
left() { local n=$(( $1 - SECONDS - $2 )); [ $n -lt 1 ] && n=1; echo $n; }
cap() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }

# session [SECONDS]: the stages in one command, in order of worth (correctness, sanitizers, timings,
# dispatch table), each step capped by its own limit and by the time left; a step that runs out
# of time fails on its own and the next still runs.
run_session() {
  local total=${1:-540} deadline
  deadline=$((SECONDS + total))
  export MAX_JOBS=${MAX_JOBS:-16} RECJPQ_CUDA_ARCHS=${RECJPQ_CUDA_ARCHS:-90}
  setup
  step "pytest GPU test files" "$(cap 140 "$(left $deadline 300)")" "$PY" -m pytest -q -rs -p no:cacheprovider \
    "${GPU_TESTS[@]}" --junitxml="$OUT/pytest.xml" -k "not full_scale"
  local sanitizer tool
  sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  for tool in memcheck racecheck synccheck; do
    if [ -z "$sanitizer" ] && [ "$DRY_RUN" != 1 ]; then skip "$tool: compute-sanitizer not found"; status=1; continue; fi
    step "compute-sanitizer $tool" "$(cap 60 "$(left $deadline 190)")" "${sanitizer:-compute-sanitizer}" \
      --tool "$tool" --error-exitcode 3 "$PY" -m pytest -q tests/test_cuda_backend.py -p no:cacheprovider \
      -k "($SANITIZER_K) and not emulated"
  done
  local bench_s
  bench_s=$(left $deadline 80)
  step "bench/gpu_bench.py (issue 22's shapes)" "$bench_s" "$PY" bench/gpu_bench.py --budget-s $((bench_s - 45)) \
    --out "$OUT" --n 1271638 10000000 --m 8 --b 1 16 64 1024 --k 10 100
  step "bench/cuda_dispatch_table.py --quick" "$(left $deadline 5)" "$PY" bench/cuda_dispatch_table.py --quick \
    --budget-s $(( $(left $deadline 5) - 30 ))
  [ "$DRY_RUN" = 1 ] || cp recjpq/backends/gpu_dispatch.json "$OUT/" 2>/dev/null
}

# cf DATA_DIR [SECONDS]: the four LightGCN runs of docs/baco.md's Gowalla section, in parallel on the
# GPU (the reference recipe: batch 2048, lr 1e-3, L2 1e-4, users drawn uniformly), each adding
# SECONDS of training to its checkpoint in ${RUNS_DIR:-.gpu_data/runs} (start-up and evaluations
# every 20 epochs are off the clock, 0.1-0.6 s each on an H100/H200: the stage allows 10% and 60 s on
# top, and 180 s more where BACO's ids are not cached yet). While they train, setup builds the extensions
# and the CUDA and Triton test files run in what is left (TESTS=0 skips them).
run_cf() {
  local data=${1:?usage: bash bench/gpu.sh cf DATA_DIR [SECONDS]} seconds=${2:-420}
  [ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
  local runs=${RUNS_DIR:-.gpu_data/runs} e pids=() build_s=0
  local embeddings=${CF_EMBEDDINGS:-full baco hash lowrank}
  # co-clustering Gowalla for BACO's ids takes minutes on the CPU, off the training clock
  [[ " $embeddings " == *" baco "* ]] && [ ! -f "$runs/lightgcn-baco/ids.pt" ] && build_s=180
  local deadline=$((SECONDS + seconds * 11 / 10 + 60 + build_s))
  for e in $embeddings; do
    local out=$runs/lightgcn-$e done_s=0
    # a run that came back from an earlier machine in parts (CKPT_PARTS=1)
    if [ ! -f "$out/checkpoint.pt" ] && compgen -G "$out/run.tar.part.*" > /dev/null; then
      cat "$out"/run.tar.part.* | tar -xf - -C "$out" || status=1
    fi
    [ -f "$out/checkpoint.pt" ] && done_s=$("$PY" -c "import sys, torch; print(int(torch.load(sys.argv[1], \
      map_location='cpu', weights_only=False)['train_seconds']))" "$out/checkpoint.pt" 2>/dev/null || echo 0)
    echo "== lightgcn-$e: $done_s s trained before, $seconds s more"
    if [ "$DRY_RUN" = 1 ]; then continue; fi
    mkdir -p "$out"
    OMP_NUM_THREADS=2 timeout $((deadline - SECONDS)) "$PY" -m recjpq train-cf --data "$data" --model lightgcn \
      --embedding "$e" --budget 0.25 --sampler users --lr 1e-3 --l2 1e-4 --batch-size 2048 --epochs 1000 \
      --eval-every 20 --time-limit $((done_s + seconds)) --device "${DEVICE:-cuda}" --no-progress --resume \
      --out "$out" > "$out/train.log" 2>&1 &
    pids+=($!)
  done
  if [ "${TESTS:-1}" = 1 ]; then
    export MAX_JOBS=${MAX_JOBS:-8} RECJPQ_CUDA_ARCHS=${RECJPQ_CUDA_ARCHS:-90}
    setup
    step "pytest tests/test_cuda_backend.py" "$(cap 150 "$(left $deadline 60)")" "$PY" -m pytest -q -rs \
      -p no:cacheprovider tests/test_cuda_backend.py -k "not full_scale" --durations 5
    step "pytest tests/test_triton_backend.py" "$(left $deadline 30)" "$PY" -m pytest -q -rs -p no:cacheprovider \
      tests/test_triton_backend.py -k "not full_scale" --durations 5
  fi
  [ "$DRY_RUN" = 1 ] && return
  for e in "${!pids[@]}"; do wait "${pids[$e]}" || status=1; done
  for e in $embeddings; do
    cp "$runs/lightgcn-$e/metrics.json" "$OUT/cf_lightgcn_$e.json" 2>/dev/null || status=1
    if [ "${CKPT_PARTS:-0}" = 1 ]; then  # $OUT takes files of up to 16 MiB: the full model's is 54 MB
      (cd "$runs/lightgcn-$e" && tar -cf - checkpoint.pt $(ls ids.pt 2>/dev/null)) \
        | split -b 15M - "$OUT/lightgcn-$e.run.tar.part." || status=1
    fi
    echo "== lightgcn-$e"; grep -v "^$" "$runs/lightgcn-$e/train.log" | tail -6
  done
}

budgets() {
  local total=0 stage work
  for stage in test:$TEST_S sanitizer:$SANITIZER_S bench:$BENCH_S dispatch:$DISPATCH_S models:$MODELS_S; do
    work=${stage#*:}
    echo "${stage%%:*}: setup ${SETUP_S}s + ${work}s + slack ${SLACK_S}s = $((SETUP_S + work + SLACK_S))s"
    total=$((total + SETUP_S + work + SLACK_S))
  done
  echo "all stages: ${total}s of device time at worst, in 5 runs of at most 600s"
}

case "$STAGE" in
  test) setup; run_tests ;;
  sanitizer) setup; run_sanitizer ;;
  bench) setup; run_bench "$@" ;;
  dispatch) setup; run_dispatch ;;
  session) run_session "$@" ;;
  cf) run_cf "$@" ;;
  models) if [ "${DEVICE:-cuda}" = cpu ]; then skip "setup (DEVICE=cpu)"; else setup; fi; run_models "$@" ;;
  budgets) budgets; exit 0 ;;
  *) echo "usage: bash bench/gpu.sh test|sanitizer|bench [gpu_bench.py args]|dispatch|session [SECONDS]|cf DATA_DIR [SECONDS]|models DATA_FILE [args]|budgets"
     exit 2 ;;
esac
echo "== stage $STAGE done in ${SECONDS}s, status $status"
for line in "${RAN[@]}"; do echo "   ran: $line"; done
for line in "${SKIPPED[@]}"; do echo "   skipped: $line"; done
exit $status
