#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (CI has none; these tests skip
# there): the CUDA-marked tests (eager CUDA pools, CUDA-graph steps == eager steps == full
# forward, every bucket, bf16 within its documented tolerance), then the streaming benchmark on
# the device with and without CUDA graphs, then the multi-edge load (`tcnserve serve --workers N`)
# against an engine on the GPU. Under 10 minutes on one GPU (16 cores on the lent machines).
# Assumes a venv with a CUDA build of torch and `pip install -e '.[dev]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name())'
timeout 300 python -m pytest -q -m cuda tests
# GPU targets (issue 10): N = 1 <= 100 us and N = 4,096 <= 2 ms per step for R1, CUDA graphs.
timeout 240 python bench/model_step.py --device cuda --ns 1 256 4096 --chunks 1000 \
    --min-time 0.1 --runs 3 --recompute-max-n 1 "$@"
# One engine on the GPU fed by 1, 4 and 8 edge processes (issue 25): steps/s and CPU per step.
timeout 180 python bench/scaling.py --device cuda --workers-list 1,4,8 --sessions 1024 \
    --seconds 4 --client-procs 4 --torch-threads 0 --no-echo
