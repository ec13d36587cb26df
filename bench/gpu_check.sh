#!/usr/bin/env bash
# The GPU check, in one short call on a lent GPU machine (bench/README.md and the README's "GPU" section):
#   1. tests/gpu/            the kernels at Llama-7B sizes, the engine (Triton kernels, CUDA graphs), the server
#   2. bench/kernels.py      each delta kernel beside its byte floor and the base GEMM, 1/8/32 tenants
#   3. bench/decode.py --quick --device cuda --cuda-graphs
#                            Llama-2-7B shape in bf16, 32 rows, 32 distinct tenants, beside HF / PEFT / merged swaps
# Everything goes to one folder, $OUT (the device tool's) or bench/results/gpu-<date>. Budget: under 8 minutes.
# The machine has torch, triton, transformers and peft but not the server's packages: bench/gpu_wheels.sh fetches
# them as wheels into .whl/ beforehand, on a machine with PyPI; carry .whl with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-$(date -u +%Y-%m-%d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/deltaserve-site .whl/*.whl \
    && export PYTHONPATH="/tmp/deltaserve-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
start=$(date +%s)
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${DELTASERVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi
  python3 -c "import sys, torch, triton, transformers, peft; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__); print(torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, at $(($(date +%s) - start))s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
step tests-gpu 210 python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200
step kernels 120 python3 bench/kernels.py --out "$OUT/kernels.json"
step decode 270 python3 bench/decode.py --quick --device cuda --cuda-graphs --out "$OUT/decode.json"
echo "== done in $(($(date +%s) - start))s; results in $OUT"
