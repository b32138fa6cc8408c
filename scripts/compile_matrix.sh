#!/usr/bin/env bash
# The offline compile matrix (kernels/compile_check.py, i.e. python -m recjpq.kernels.compile_check)
# under both Triton versions we support, with no GPU: the one the GPU machines run (3.6, with
# torch 2.11+cu130) for sm_90, and the newest for sm_90 and sm_80 plus every CUDA kernel through
# nvcc. Each Triton is pinned and installed once into a side directory (pip --target) under
# $CACHE, which also keeps Triton's kernel cache, so a rerun only recompiles what changed.
#   bash scripts/compile_matrix.sh           # CI: --sample (each axis value at least once)
#   FULL=1 bash scripts/compile_matrix.sh    # every cell (hundreds of compiles: not for CI)
# Exits non-zero on a compile error or on spills in a top-k or scores kernel. Tables and JSON go
# to $OUT. Cost on the 2-core CI machine: see docs/triton-kernels.md ("Compile matrix").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
CACHE="${RECJPQ_COMPILE_CACHE:-$HOME/.cache/recjpq-compile-matrix}"
OUT="${OUT:-$CACHE/results}"
JOBS="${JOBS:-$(nproc)}"
MACHINES_TRITON=3.6.0  # the GPU machines' Triton
NEWEST_TRITON=3.9.0
mkdir -p "$CACHE" "$OUT"
SCOPE=--sample; [ "${FULL:-0}" = 1 ] && SCOPE=

# Prints the PYTHONPATH entry that provides triton==$1: none if the environment's Triton is that
# version, else a side directory, installed on first use.
triton_path() {
  local version=$1 side="$CACHE/triton-$1"
  if [ "$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null)" = "$version" ]; then
    return
  fi
  if [ ! -f "$side/.installed" ]; then
    echo "== installing triton==$version into $side" >&2
    rm -rf "$side"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$side" "triton==$version" >&2
    touch "$side/.installed"
  fi
  echo "$side"
}

run_matrix() {
  local version=$1; shift
  local side; side=$(triton_path "$version")
  echo "== Triton $version: python -m recjpq.kernels.compile_check $* $SCOPE"
  PYTHONPATH="$side${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$CACHE/kernels-$version" \
    "$PY" -W ignore -m recjpq.kernels.compile_check "$@" $SCOPE --jobs "$JOBS" \
    --json "$OUT/compile_matrix_triton$version.json" | tee "$OUT/compile_matrix_triton$version.txt"
}

status=0
run_matrix "$MACHINES_TRITON" --arch 90 --no-cuda || status=1
run_matrix "$NEWEST_TRITON" --arch 90 80 || status=1
echo "== compile matrix: $([ $status = 0 ] && echo passed || echo FAILED) in ${SECONDS}s"
exit $status
