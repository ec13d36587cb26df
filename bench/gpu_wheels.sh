#!/usr/bin/env bash
# Fetches, into .whl/, the wheels bench/gpu_check.sh needs on the GPU machine and does not find there (its image
# has torch, triton, transformers, peft, httpx, anyio, prometheus-client; Python 3.12, x86-64): the server's
# packages and the openai client, at the versions of this checkout's .venv. Run it where PyPI is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY="${PYTHON:-.venv/bin/python}"
NAMES=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv python-multipart uvicorn openai jiter
       distro sniffio typing-inspection annotated-types annotated-doc)
mkdir -p .whl
for name in "${NAMES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n "s/^Version: //p" || true)
  spec="$name${version:+==$version}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
du -sh .whl
