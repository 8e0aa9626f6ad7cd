# tcnserve: one server, its edge processes in front of one engine process (sessions live in the
# engine's memory, and move between replicas through the session store: docs/durability.md).
#
#   docker build -t tcnserve:0.1.0 .                # CPU: torch from PyTorch's CPU wheel index
#   docker run -p 127.0.0.1:8000:8000 -e TCNSERVE_API_KEYS=<a key of 16+ chars> tcnserve:0.1.0
#
# CUDA: the CUDA builds of torch bundle their CUDA libraries, so the same base image works with
# the NVIDIA container runtime; name the CUDA wheel index matching your driver:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#       -t tcnserve:0.1.0-cuda .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -e TCNSERVE_DEVICE=cuda tcnserve:0.1.0-cuda
# or start from another base image with --build-arg BASE_IMAGE=... (it needs python3.11+).
# Without an explicit index, pip on Linux resolves torch to the CUDA build (~20 NVIDIA packages).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# 0.0.0.0: inside a container the server must listen on all interfaces to be reachable. Expose it
# only through a proxy or a Service (deploy/), or publish on loopback (-p 127.0.0.1:8000:8000).
# The server bounds requests itself (request_timeout_s, max_connections, max_body_bytes,
# max_inflight_body_bytes, per-key quotas: docs/service.md); a proxy adds client timeouts.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TCNSERVE_HOST=0.0.0.0 \
    TCNSERVE_PORT=8000

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tcnserve
WORKDIR /app

COPY pyproject.toml README.md constraints.txt ./
COPY model ./model
COPY service ./service

# The README's install steps, every version pinned by constraints.txt (the lock; refresh it with
# scripts/lock_image_deps.sh): torch first, from TORCH_INDEX_URL (the CPU build by default)
# without its dependencies, then the project and the rest from PyPI, torch already satisfied.
# An index for TORCH_INDEX_URL needs to hold only torch (scripts/torch_cpu_index.sh writes one).
# Then /app is emptied: what was copied, and the build/ and egg-info the build left there.
RUN python -m pip install --upgrade -c constraints.txt pip \
 && python -m pip install --no-deps -c constraints.txt \
      --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python -m pip install -c constraints.txt . \
 && rm -rf /app/*

USER tcnserve
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TCNSERVE_PORT', '8000'), timeout=2)"

# `tcnserve serve` starts one edge process per usable core (the container's CPU quota counts),
# at most 8, before one engine process that holds every session (docs/scaling.md); set
# TCNSERVE_WORKERS to choose. Never run the app under `uvicorn --workers` (it refuses).
ENTRYPOINT ["tcnserve"]
CMD ["serve"]
