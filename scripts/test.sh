#!/usr/bin/env bash
# The test command of the README: sets up the machine, lints, and runs the whole suite.
# Triton kernels run on the CPU through Triton's interpreter; GPU-only tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
