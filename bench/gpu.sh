#!/usr/bin/env bash
# The GPU check, for sessions lent a CUDA machine: builds the venv if needed, then one short run of bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
exec .venv/bin/python bench/gpu.py "$@"
