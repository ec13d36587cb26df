#!/usr/bin/env bash
# Sets up a fresh machine for deltaserve: a virtual environment in .venv with torch, triton and the package.
# On a machine without an NVIDIA GPU it installs the CPU build of torch (pinned, so pip never fetches a
# multi-GB CUDA build); with a GPU, the default (CUDA) build of the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${DELTASERVE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  python -m pip install -q "torch==$TORCH_VERSION"
else
  # CPU build: a local wheel where the machine has one (pip's find-links), else PyTorch's CPU index.
  python -m pip install -q "torch==$TORCH_VERSION" --only-binary=:all: ${DELTASERVE_TORCH_INDEX:+--index-url "$DELTASERVE_TORCH_INDEX"}
  python -c "import torch, sys; sys.exit(0 if not torch.version.cuda else 1)" || {
    echo "setup: got a CUDA build of torch on a machine without a GPU; set DELTASERVE_TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2
    exit 1; }
fi
python -m pip install -q -e ".[dev]"
# The compiled CPU delta kernels (deltakernels/csrc), built once for this machine into ~/.cache/deltaserve/kernels
# (or $DELTASERVE_KERNEL_CACHE). Without a compiler the engine falls back to the torch references, and says so.
python -m deltakernels.cpu_extension || echo "setup: the CPU delta kernels were not built; CPU serving uses the slower torch references" >&2
# promtool (Debian's prometheus package) checks deploy/'s Prometheus config and alert rules in the tests; as root
# with apt it is installed, elsewhere those tests skip and say why.
if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
    || echo "setup: prometheus (promtool) could not be installed; the tests of deploy/'s rules will skip" >&2
fi
# PostgreSQL (Debian's postgresql package): the tests of a registry shared through a PostgreSQL catalog start a
# real server; as root with apt it is installed, elsewhere those tests skip and say why.
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1; } \
    || echo "setup: postgresql could not be installed; the tests of a shared PostgreSQL catalog will skip" >&2
fi
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
