#!/usr/bin/env bash
# The GPU check, for sessions lent a CUDA machine: one short run of bench/gpu.py. It takes .venv if there is one,
# else a python3 that already has CUDA torch (a GPU image, often without a package registry), else builds .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then PY=python3
else make .venv/.installed; PY=.venv/bin/python
fi
PYTHONPATH=. exec "$PY" bench/gpu.py "$@"
