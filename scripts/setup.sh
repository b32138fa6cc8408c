#!/usr/bin/env bash
# Set up recjpq on a fresh machine: torch (kept if one is installed, else the CPU build pinned
# for these machines), test and benchmark dependencies, then recjpq itself with its extensions.
# GPU users: install a CUDA build of torch first (see README); this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -r requirements-dev.txt
$PIP --no-build-isolation -e .
python -c "import recjpq; print('recjpq', recjpq.__version__, 'backends on cpu:', recjpq.available_backends('cpu'))"
