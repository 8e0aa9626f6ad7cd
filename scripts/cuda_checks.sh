#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (CI has none; these tests skip
# there): the CUDA-marked tests (eager CUDA pools, CUDA-graph steps == eager steps == full
# forward, every bucket, bf16 within its documented tolerance), then the streaming benchmark on
# the device with and without CUDA graphs. Under 8 minutes on one GPU.
# Assumes a venv with a CUDA build of torch and `pip install -e '.[dev]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name())'
timeout 300 python -m pytest -q -m cuda tests
# GPU targets (issue 10): N = 1 <= 100 us and N = 4,096 <= 2 ms per step for R1, CUDA graphs.
timeout 240 python bench/model_step.py --device cuda --ns 1 256 4096 --chunks 1000 \
    --min-time 0.1 --runs 3 --recompute-max-n 1 "$@"
