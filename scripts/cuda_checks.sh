#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (CI has none; these tests skip
# there): the CUDA-marked tests, then the streaming benchmark on the device.
# Assumes a venv with a CUDA build of torch and `pip install -e '.[dev]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print(torch.cuda.get_device_name())'
python -m pytest -q -m cuda tests
python bench/model_step.py --device cuda --quick "$@"
