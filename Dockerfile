# deltaserve: the HTTP server (`deltaserve serve`) in a CUDA-capable image.
#
#   docker build -t deltaserve .
#   docker run --gpus all -p 8000:8000 -v deltaserve-registry:/data/registry deltaserve          # the embedded demo
#   docker run --gpus all -p 8000:8000 -v deltaserve-registry:/data/registry \
#       -v /srv/models/Llama-3.1-8B:/models/llama:ro -e DELTASERVE_ADMIN_KEY=... deltaserve --model /models/llama
#
# torch's default Linux x86_64 wheel on PyPI is the CUDA build and brings the CUDA runtime libraries with it, so a
# plain Python base image is enough: the host needs only the NVIDIA driver and the NVIDIA container toolkit.
# Without a GPU the same image runs on the CPU (`--device auto` picks it).
# Every server option is a flag after the image name or a DELTASERVE_* environment variable (-e DELTASERVE_PORT=...).
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    DELTASERVE_KERNEL_CACHE=/opt/deltaserve-kernels \
    VIRTUAL_ENV=/opt/deltaserve \
    PATH=/opt/deltaserve/bin:$PATH

# Triton compiles a small C launcher the first time a kernel runs: it needs a C compiler and libc headers. The CPU
# delta kernels (deltakernels/csrc) are C++, built once below into DELTASERVE_KERNEL_CACHE.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer: it is the large download and changes least often.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md /src/
COPY serving /src/serving
COPY deltakernels /src/deltakernels
COPY formats /src/formats
COPY registry /src/registry
COPY loadtest /src/loadtest
RUN pip install /src \
    && rm -rf /src \
    && python -m deltakernels.cpu_extension \
    && python -c "import torch, serving.cli; from serving.demo import demo_tenants, demo_dir; \
assert (demo_dir() / 'base' / 'config.json').is_file(), 'demo assets not installed'; demo_tenants(); \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"

RUN useradd --system --uid 10001 --create-home --home-dir /home/deltaserve --shell /usr/sbin/nologin deltaserve \
    && mkdir -p /data/registry \
    && chown deltaserve:deltaserve /data/registry

USER deltaserve
WORKDIR /home/deltaserve
# The registry (tenants, keys, adapters): keep it on a volume so it survives the container.
VOLUME ["/data/registry"]
EXPOSE 8000

# /health answers 200 as long as the engine is alive; loading a large model can take a while, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('DELTASERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) drains: running requests get DELTASERVE_DRAIN_TIMEOUT seconds (default 30) to finish,
# so give `docker stop` a longer grace period (-t 40, or stop_grace_period in compose).
ENTRYPOINT ["deltaserve", "serve", "--host", "0.0.0.0", "--registry", "/data/registry"]
CMD []
