#!/usr/bin/env bash
# Installs NVIDIA's perf_analyzer (the load generator Triton users run) under DIR (default
# .perf_analyzer/) and writes DIR/perf_analyzer, a wrapper that runs it; prints the wrapper's
# path. tests/service/test_perf_analyzer.py runs it when TCNSERVE_PERF_ANALYZER names it.
#
# Where the binary comes from (docs/oip.md): tritonclient's manylinux wheels carry it up to
# 2.60; on Debian 12 (glibc 2.36) only 2.51.0's runs (later ones need glibc 2.38). It links
# libb64 (Debian's libb64-0d) and libcudart (the nvidia-cuda-runtime-cu12 wheel: no GPU or driver
# is needed for HTTP). Exit status 3: it cannot be installed on this machine (said in one line).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.perf_analyzer}"
TRITONCLIENT=2.51.0
CUDART=12.9.79

cannot() { echo "install_perf_analyzer: $*" >&2; exit 3; }
[ "$(uname -sm)" = "Linux x86_64" ] || cannot "needs Linux x86_64 (tritonclient's wheel), not $(uname -sm)"
if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || cannot "needs libb64-0d (apt-get, as root)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi
python3 -m pip install -q --no-deps --only-binary=:all: --upgrade --target "$DIR" \
    "tritonclient==$TRITONCLIENT" "nvidia-cuda-runtime-cu12==$CUDART"
cat >"$DIR/perf_analyzer" <<WRAPPER
#!/bin/sh
LD_LIBRARY_PATH="$(pwd)/$DIR/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
    exec "$(pwd)/$DIR/bin/perf_analyzer" "\$@"
WRAPPER
chmod +x "$DIR/perf_analyzer"
"$DIR/perf_analyzer" --version >/dev/null 2>&1 || cannot "$DIR/bin/perf_analyzer does not run here: $("$DIR/perf_analyzer" --version 2>&1 | head -1)"
echo "$(pwd)/$DIR/perf_analyzer"
