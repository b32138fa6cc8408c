#!/usr/bin/env bash
# GPU checks of the "cuda" backend, from the repository root of a GPU machine where recjpq is
# installed (bench/gpu.sh calls this after its test run):
#   1. the extension is importable (else a JIT build of csrc/cuda with ninja);
#   2. tests/test_cuda_backend.py on the GPU, then again under compute-sanitizer memcheck
#      (small shapes only: the full-scale and fuzz tests are slow under the sanitizer);
#   3. bench/cuda_dispatch_table.py --quick: times "cuda" against "triton" per shape and rewrites
#      recjpq/backends/gpu_dispatch.json (a copy with the machine goes to ${OUT:-bench/results}).
# Each step has its own timeout; the script exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

echo "== cuda backend availability"
if ! "$PY" -c "import torch, recjpq.backends.cuda as c; r = c.unavailable_reason(torch.device('cuda')); print(r or 'ok'); assert r is None"; then
  echo "== trying the JIT build (RECJPQ_CUDA_JIT=1)"
  export RECJPQ_CUDA_JIT=1
  timeout 600 "$PY" -c "import recjpq.backends.cuda as c; c.build_jit(); print('JIT build ok')" || { echo "no cuda backend"; exit 1; }
fi

echo "== tests/test_cuda_backend.py"
timeout 300 "$PY" -m pytest -q -rs tests/test_cuda_backend.py tests/test_cuda_compile.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ -n "$SANITIZER" ]; then
  echo "== compute-sanitizer memcheck"
  timeout 300 "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check no \
    "$PY" -m pytest -q -x tests/test_cuda_backend.py -k "not full_scale and not fuzz and not emulated" 2>&1 | tee "$OUT/cuda_memcheck.log" \
    || status=1
else
  echo "compute-sanitizer not found: memcheck skipped"; status=1
fi

echo "== dispatch table"
timeout 300 "$PY" bench/cuda_dispatch_table.py --quick --budget-s 200 || status=1
exit $status
