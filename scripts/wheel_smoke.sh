#!/usr/bin/env bash
# Build recjpq's wheel in a fresh venv (the pip that `python -m venv` ships, the newest setuptools,
# the same torch as the calling python) with `python -m build --wheel --no-isolation`, install it
# there with its core dependencies only, and smoke-test it from outside the source tree: import,
# the compiled recjpq._C against the reference backend, the packaged data, the console script.
#   bash scripts/wheel_smoke.sh            (CI runs it; WHEEL_DIR=DIR keeps the wheel there)
# torch==<the caller's version> is installed into the venv: pip must be able to find that build
# (the CPU wheel is in this machine's local wheel folder, so nothing multi-GB is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
TORCH=$(python -c "import torch; print(torch.__version__)")
WORK=$(mktemp -d -t recjpq-wheel-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
python -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"
$PIP "torch==$TORCH"
$PIP --upgrade setuptools wheel ninja build
"$PY" -m pip --version
"$PY" -c "import setuptools; print('setuptools', setuptools.__version__)"
# the build folder of the source tree is not reused: the wheel is built from scratch
"$PY" -m build --wheel --no-isolation --outdir "$WORK/dist" "$SRC" >"$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log"; echo "wheel build failed"; exit 1; }
WHEEL=$(ls "$WORK"/dist/recjpq-*.whl)
echo "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
$PIP "$WHEEL"
if [ -n "${WHEEL_DIR:-}" ]; then mkdir -p "$WHEEL_DIR" && cp "$WHEEL" "$WHEEL_DIR"/; fi

cd "$WORK"  # away from the source tree, so only the installed package can be imported
"$PY" - <<'EOF'
import importlib.resources
import importlib.util
import sys

import torch

import recjpq
import recjpq._C  # noqa: F401  the C++ extension was compiled into the wheel
from recjpq import ops

assert recjpq.__file__.startswith(sys.prefix), f"recjpq imported from {recjpq.__file__}, not the venv"
assert importlib.util.find_spec("recjpq.kernels") is not None, "recjpq.kernels (Triton kernels) missing"
assert importlib.resources.files("recjpq.backends").joinpath("gpu_dispatch.json").is_file()
extras = [m for m in ("triton", "fastapi", "uvicorn", "httpx", "faiss", "matplotlib", "pytest")
          if importlib.util.find_spec(m) is not None]
assert not extras, f"the core install pulled in optional packages: {extras}"
assert recjpq.available_backends("cpu") == ["reference", "cpu"], recjpq.available_backends("cpu")

g = torch.Generator().manual_seed(0)
S = torch.randint(-20, 21, (3, 8, 256), generator=g).float()  # integer scores: every summation order agrees
codes = torch.randint(0, 256, (5003, 8), generator=g, dtype=torch.uint8)
exclude = torch.randint(-1, 5003, (3, 7), generator=g)
want = ops.pq_topk(S, codes, 10, exclude=exclude, backend="reference")
for algorithm in ("exhaustive", "prune"):
    got = ops.pq_topk(S, codes, 10, exclude=exclude, backend="cpu", algorithm=algorithm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (algorithm, got, want)
print(f"recjpq {recjpq.__version__} from {recjpq.__file__}: pq_topk cpu == reference")
EOF
"$WORK/venv/bin/recjpq" --help >/dev/null
"$PY" -m recjpq train --help >/dev/null
echo "wheel smoke test passed"
