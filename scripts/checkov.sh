#!/usr/bin/env bash
# checkov over the manifests as kustomize renders them: deploy/ as it is, and its GPU variant
# (`components: [gpu]` uncommented, as deploy/README.md tells a user to do). Offline
# (--skip-download: no policies or guidelines fetched). Fails on any finding not skipped in the
# manifests by a `checkov.io/skip<n>: CHECK=reason` annotation; deploy/README.md ("Static
# checks") lists each skip and its reason.
#
# checkov lives in a venv of its own (its pinned dependencies clash with the project's), outside
# the work tree and kept between runs: $TCNSERVE_CHECKOV_VENV, by default one per checkov version
# under ~/.cache/tcnserve/. kustomize is kubectl's (`kubectl kustomize`) or a standalone one.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
venv="${TCNSERVE_CHECKOV_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tcnserve/checkov-$CHECKOV_VERSION}"

if ! "$venv/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    # Absent, another version, or a half-finished install: make it anew.
    if [ -f "$venv/pyvenv.cfg" ]; then rm -rf "$venv"; fi
    python3 -m venv "$venv"
    # pip's own output only when it fails (this machine's pip config warns once per package).
    if ! log="$("$venv/bin/python" -m pip install -q --disable-pip-version-check \
        "checkov==$CHECKOV_VERSION" 2>&1)"; then
        echo "$log" >&2
        exit 1
    fi
fi

if command -v kubectl >/dev/null 2>&1; then
    render=(kubectl kustomize)
elif command -v kustomize >/dev/null 2>&1; then
    render=(kustomize build)
else
    echo "checkov.sh: needs kubectl (kubectl kustomize) or kustomize to render deploy/" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r deploy "$work/gpu"
sed -i 's/^# components:$/components:/; s/^#   - gpu$/  - gpu/' "$work/gpu/kustomization.yaml"
grep -qx '  - gpu' "$work/gpu/kustomization.yaml" || {
    echo "checkov.sh: no commented-out 'components: [gpu]' in deploy/kustomization.yaml" >&2
    exit 1
}
"${render[@]}" deploy >"$work/cpu.yaml"
"${render[@]}" "$work/gpu" >"$work/gpu.yaml"

status=0
for variant in cpu gpu; do
    # timeout: a checkov that tried the network anyway fails here rather than hang CI.
    timeout 300 "$venv/bin/checkov" --skip-download --framework kubernetes --compact \
        -f "$work/$variant.yaml" -o json --output-file-path "$work/$variant" >/dev/null ||
        status=1
    "$venv/bin/python" - "$work/$variant/results_json.json" "$variant" <<'PY' || status=1
import json
import sys

report = json.load(open(sys.argv[1]))
summary, results = report["summary"], report["results"]
print(
    f"checkov {summary['checkov_version']}, deploy/ rendered, {sys.argv[2]} variant, "
    f"{summary['resource_count']} resources: Passed checks: {summary['passed']}, "
    f"Failed checks: {summary['failed']}, Skipped checks: {summary['skipped']}"
)
for check in results["skipped_checks"]:
    reason = check["check_result"]["suppress_comment"]
    print(f"  skipped {check['check_id']} for {check['resource']}: {reason}")
for check in results["failed_checks"]:
    print(f"  FAILED {check['check_id']} {check['check_name']!r} for {check['resource']}")
# Nothing read, or a file checkov could not parse, would otherwise pass in silence.
if summary["resource_count"] == 0 or summary["parsing_errors"] or summary["failed"]:
    sys.exit("  fix it, or skip it with its reason: deploy/README.md, \"Static checks\"")
PY
done
exit "$status"
