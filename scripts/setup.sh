#!/usr/bin/env bash
# Set up recjpq on a fresh machine for the README's two commands (the demo and the tests): torch
# (kept if one is installed, else the CPU build pinned for these machines), the build tools, then
# recjpq itself, editable, with its C++ extension and the `dev` extra (tests, benchmarks, demo,
# serving, FAISS, Triton). GPU users: install a CUDA build of torch first (see README); it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --disable-pip-version-check"
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0  # a bare `torch` is a multi-GB CUDA build
# --no-build-isolation (the build must use the torch above) also skips installing the build
# requirements of pyproject.toml: install them here
$PIP "setuptools>=64" wheel ninja
$PIP --no-build-isolation -e ".[dev]"
python -c "import recjpq; print('recjpq', recjpq.__version__, 'backends on cpu:', recjpq.available_backends('cpu'))"
