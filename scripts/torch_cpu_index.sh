#!/usr/bin/env bash
# Write a PEP 503 index holding only the CPU build of torch to DIR, for the Dockerfile's
# TORCH_INDEX_URL (file:///... or served over http) on machines that cannot reach PyTorch's own
# wheel index.
#
#   scripts/torch_cpu_index.sh DIR [VERSION]      # VERSION: default the Dockerfile's TORCH_VERSION
#
# The wheel comes from `pip download torch==VERSION+cpu` under pip's own configuration: a
# find-links folder where the wheel is cached, or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# Only torch: the Dockerfile installs it with --no-deps and takes its dependencies from PyPI,
# pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:?usage: scripts/torch_cpu_index.sh DIR [VERSION]}
version=${2:-$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)}
python=${PYTHON:-python3}

mkdir -p "$dir/torch"
# The image's interpreter and platform, whatever this machine runs.
if ! "$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.11 --platform manylinux_2_28_x86_64 -d "$dir/torch" \
    "torch==${version}+cpu" 2>"$dir/pip.log"; then
    cat "$dir/pip.log" >&2
    echo "torch_cpu_index: no torch==${version}+cpu wheel (set PIP_EXTRA_INDEX_URL, above)" >&2
    exit 1
fi
rm -f "$dir/pip.log"
"$python" - "$dir" <<'EOF'
import pathlib
import sys
import urllib.parse

root = pathlib.Path(sys.argv[1])
wheels = sorted(p.name for p in (root / "torch").glob("torch-*.whl"))
links = "".join(f'<a href="{urllib.parse.quote(w)}">{w}</a>\n' for w in wheels)
(root / "torch" / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
(root / "index.html").write_text('<!DOCTYPE html>\n<html><body><a href="torch/">torch</a></body></html>\n')
EOF
