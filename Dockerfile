# tcnserve: one process, one uvicorn worker (sessions live in its memory).
#
#   docker build -t tcnserve .                      # CPU
#   docker run -p 127.0.0.1:8000:8000 -e TCNSERVE_API_KEYS=<a key of 16+ chars> tcnserve
#
# CUDA: the CUDA builds of torch bundle their CUDA libraries, so the same base image works with
# the NVIDIA container runtime; point pip at PyTorch's wheel index for your CUDA version:
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch CUDA wheel index> -t tcnserve:cuda .
#   docker run --gpus all -p 8000:8000 -e TCNSERVE_DEVICE=cuda tcnserve:cuda
# or start from another base image with --build-arg BASE_IMAGE=... (it needs python3.11+).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""

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

COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service

# The README's install steps: torch pinned first (an unpinned torch pulls a multi-GB CUDA build
# from the default index), then the project.
RUN python -m pip install --upgrade pip \
 && python -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python -m pip install -e .

USER tcnserve
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TCNSERVE_PORT', '8000'), timeout=2)"

# Never add --workers: a second worker would not see the first one's sessions.
ENTRYPOINT ["tcnserve"]
CMD ["serve"]
