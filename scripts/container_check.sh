#!/usr/bin/env bash
# The container check: build the image from the Dockerfile as it is, with podman, run it the
# way deploy/tcnserve.yaml runs it, and check what a user and the cluster would see.
#
#   scripts/container_check.sh        # as root (CI: .ci/run); PYTHON: the project's venv python
#
# 1. Tools: podman, runc and mmdebstrap from Debian (installed when missing, as root), driven
#    through a private containers.conf and storage under a temporary folder that is removed at
#    the end: nothing is cached between runs and the machine's podman setup is left alone.
# 2. Base: a stand-in for the Dockerfile's FROM (python:3.11-slim-bookworm), built with
#    mmdebstrap from the machine's Debian mirror (python3 as `python`, pip, venv,
#    ca-certificates) and imported under that exact name, since Docker Hub may be unreachable.
# 3. Build: `podman build --format docker` (OCI drops HEALTHCHECK) from the unmodified
#    Dockerfile, TORCH_INDEX_URL a folder index holding the CPU torch wheel
#    (scripts/torch_cpu_index.sh), the host's CA bundle mounted read-only into the RUN steps.
# 4. Image: every package the Dockerfile installed is pinned by constraints.txt at that version,
#    `pip check` passes; its size and largest packages are printed.
# 5. Run: read-only root, /tmp a tmpfs, all capabilities dropped, no-new-privileges, the image's
#    own USER, a seeded checkpoint mounted read-only as --model tiny, the API key from a mounted
#    file. Inside (scripts/container_inside.py): uid/gid 10001, no capabilities, the mounts, no
#    source or build leftovers. Outside (scripts/container_probe.py): /readyz, predict, an HTTP
#    session and a WebSocket session equal to this checkout's forward of the checkpoint, 401
#    without the key. Then the HEALTHCHECK, and SIGTERM: /readyz 503 draining, exit status 0.
# 6. Refusals: a model directory the container user cannot enter (0700), and one whose files it
#    cannot read (0600): exit 2 with the settings' message, no traceback.
#
# Exit 0 when every check passed; 1 (FAILED, naming the check) on any failure; 0 with one
# SKIPPED line only when the container tools cannot run on this machine at all (not root and
# podman missing, no user namespaces, containers refused by the kernel, no way to install
# them): everything up to a container running the stand-in base is the machine's, everything
# from the project's build on is the project's.
set -eEuo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

say() { printf 'container check [%3ds]: %s\n' "$((SECONDS - started))" "$*"; }
skip() {
    say "SKIPPED, the container tools cannot run on this machine: $*"
    exit 0
}
fail() {
    say "FAILED: $*" >&2
    exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR

# --- 1. tools --------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || skip "not root, and ${missing[*]} not installed"
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    say "installing ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >/tmp/tcnserve-container-check-apt.log 2>&1 ||
        skip "apt-get could not install ${missing[*]} ($(tail -1 /tmp/tcnserve-container-check-apt.log))"
    rm -f /tmp/tcnserve-container-check-apt.log
fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/tcnserve-container-check.XXXXXX")
image=localhost/tcnserve:container-check
container=tcnserve-container-check
mkdir -p "$work/storage" "$work/run" "$work/tmp"
# runc: crun refuses some machines' cgroup setups; cgroupfs: no systemd needed; the ulimits:
# podman's defaults may exceed a machine's hard limits.
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$work/libpod"
EOF
cat >"$work/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
export TMPDIR=$work/tmp XDG_DATA_HOME=$work/data  # (rootless podman writes there too)
cleanup() {  # only ever the private storage above, which then goes with the folder
    podman rm -f -t 0 "$container" >/dev/null 2>&1 || true
    podman rmi -a -f >/dev/null 2>&1 || true
    rm -rf "$work" 2>/dev/null || say "note: could not remove $work"
}
trap cleanup EXIT
if [ "$(id -u)" -ne 0 ]; then
    podman unshare true 2>/dev/null || skip "no user namespaces for rootless podman"
fi
say "podman $(podman version --format '{{.Client.Version}}'), work folder $work"

# --- 2. the stand-in base image --------------------------------------------------------------
base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
[[ $base =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]] ||
    fail "the Dockerfile's base $base is not python:X.Y-slim-SUITE: no Debian stand-in for it"
base_python=${BASH_REMATCH[1]}
suite=${BASH_REMATCH[2]}
mirrors=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && grep -q "^[^#]*$suite" "$f" && mirrors+=("$f")
done
[ ${#mirrors[@]} -gt 0 ] || mirrors=(http://deb.debian.org/debian)
say "building the stand-in for $base: Debian $suite from ${mirrors[*]}"
# No EXTERNALLY-MANAGED: like python:3.11-slim, pip may install into the system Python.
# shellcheck disable=SC2016  # "$1" is the hook's, expanded by mmdebstrap
mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    "$suite" "$work/base.tar" "${mirrors[@]}" >"$work/mmdebstrap.log" 2>&1 ||
    skip "mmdebstrap could not build a Debian $suite root ($(tail -1 "$work/mmdebstrap.log"))"
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$work/base.tar" "docker.io/library/$base" >/dev/null 2>"$work/import.log" ||
    skip "podman cannot import an image ($(tail -1 "$work/import.log"))"
rm -f "$work/base.tar"
podman run --rm --network none --no-healthcheck "$base" true >/dev/null 2>"$work/preflight.log" ||
    skip "podman cannot run a container ($(grep -v systemd "$work/preflight.log" | tail -1))"
have=$(podman run --rm --network none "$base" python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$base_python" ] ||
    fail "the stand-in has Python $have, the Dockerfile's base $base_python"
say "stand-in ready: Python $have runs in a container"
python=${PYTHON:-.venv/bin/python}
"$python" -c 'import httpx, torch, websockets, model' 2>/dev/null ||
    fail "$python cannot import the project (httpx, torch, websockets, model): set PYTHON"

# --- 3. build --------------------------------------------------------------------------------
PYTHON=$python scripts/torch_cpu_index.sh "$work/torch-index"
ca=/etc/ssl/certs/ca-certificates.crt
ca_mount=()
[ -f "$ca" ] && ca_mount=(-v "$ca:$ca:ro")
say "building the image (log: build.log, printed on failure)"
build_started=$SECONDS
if ! timeout 900 podman build --format docker --network host --pull=never "${ca_mount[@]}" \
    -v "$work/torch-index:/torch-index:ro" --build-arg TORCH_INDEX_URL=file:///torch-index \
    -f Dockerfile -t "$image" . >"$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    fail "the image did not build"
fi
build_s=$((SECONDS - build_started))
say "ok: built $image in ${build_s} s"

# --- 4. the image ----------------------------------------------------------------------------
[ "$(podman image inspect --format '{{.Config.User}}' "$image")" = tcnserve ] ||
    fail "the image's USER is not tcnserve"
healthcheck=$(podman image inspect --format '{{json .HealthCheck}}' "$image")
[[ $healthcheck == *healthz* ]] || fail "the image has no HEALTHCHECK on /healthz: $healthcheck"
say "ok: USER tcnserve, HEALTHCHECK $healthcheck"
freeze=(--rm --network none --no-healthcheck --entrypoint python)
podman run "${freeze[@]}" "docker.io/library/$base" -m pip freeze --all >"$work/base.txt" 2>/dev/null
podman run "${freeze[@]}" "$image" -m pip freeze --all >"$work/image.txt" 2>/dev/null
"$python" scripts/container_probe.py pinned "$work/base.txt" "$work/image.txt" constraints.txt |
    sed 's/^/container check: /' || fail "the lock"
podman run "${freeze[@]}" "$image" -m pip check >"$work/pip-check.txt" 2>&1 ||
    fail "pip check in the image: $(cat "$work/pip-check.txt")"
say "ok: pip check: $(cat "$work/pip-check.txt")"
size=$(podman image inspect --format '{{.Size}}' "$image")
size_text=$(awk -v b="$size" 'BEGIN { printf "%.2f GB (%d MB)", b / 1e9, b / 1e6 }')

# --- 5. run it as the Deployment does --------------------------------------------------------
mkdir -p "$work/models" "$work/keys"
"$python" scripts/container_probe.py make-model "$work/models/tiny"
key=container-check-$RANDOM$RANDOM-key
printf '%s\n' "$key" >"$work/keys/keys"
chmod 0755 "$work" "$work/models" "$work/models/tiny" "$work/keys"
chmod 0644 "$work/models/tiny"/* "$work/keys/keys"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
restricted=(--read-only --read-only-tmpfs=false --tmpfs "/tmp:rw,nosuid,nodev,size=64m"
    --cap-drop=ALL --security-opt=no-new-privileges -e TCNSERVE_DEVICE=cpu
    -e TCNSERVE_WORKERS=2 -e TCNSERVE_TORCH_THREADS=1)
podman run -d --name "$container" "${restricted[@]}" -p "127.0.0.1:$port:8000" \
    -v "$work/models/tiny:/models/tiny:ro" -v "$work/keys:/etc/tcnserve/api-keys:ro" \
    -e TCNSERVE_API_KEYS_FILE=/etc/tcnserve/api-keys/keys -e TCNSERVE_DRAIN_S=5 \
    -e TCNSERVE_MAX_SESSIONS=64 "$image" serve --model tiny=/models/tiny \
    >/dev/null 2>"$work/run.log" || fail "podman run: $(grep -v systemd "$work/run.log")"
say "started $container on $url"
logs() { podman logs "$container" 2>&1 | tail -40 >&2; }
"$python" scripts/container_probe.py check "$url" "$work/models/tiny" "$key" |
    sed 's/^/container check: /' || { logs; fail "the server's answers"; }
podman exec -i "$container" python - <scripts/container_inside.py | sed 's/^/container check: /' ||
    fail "inside the container"
podman healthcheck run "$container" >"$work/health.txt" 2>&1 ||
    fail "the HEALTHCHECK: $(cat "$work/health.txt")"
health=$(podman inspect --format '{{.State.Healthcheck.Status}}' "$container")
[ "$health" = healthy ] || fail "the container's health is $health after its HEALTHCHECK ran"
say "ok: the HEALTHCHECK ran and the container is $health"

stop_started=$SECONDS
podman kill --signal TERM "$container" >/dev/null
"$python" scripts/container_probe.py drain "$url" | sed 's/^/container check: /' ||
    { logs; fail "the drain"; }
status=$(timeout 90 podman wait "$container") || { logs; fail "no exit within 90 s of SIGTERM"; }
[ "$status" = 0 ] || { logs; fail "exit status $status after SIGTERM, not 0"; }
if podman logs "$container" 2>&1 | grep -q Traceback; then
    logs
    fail "a traceback in the server's log"
fi
say "ok: SIGTERM: drained and exited 0 after $((SECONDS - stop_started)) s, no traceback logged"
podman rm "$container" >/dev/null 2>&1  # podman without systemd: a line about its timers

# --- 6. unreadable models are refused by name ------------------------------------------------
refused() {  # the model's directory mode, its files' mode, what the check is called
    rm -rf "$work/models/refused"
    cp -r "$work/models/tiny" "$work/models/refused"
    chmod "$2" "$work/models/refused"/*
    chmod "$1" "$work/models/refused"
    local out rc=0
    out=$(timeout 120 podman run --rm --no-healthcheck "${restricted[@]}" \
        -v "$work/models/refused:/models/m:ro" "$image" serve --model m=/models/m 2>&1) || rc=$?
    if [ "$rc" -ne 2 ] || [[ $out == *Traceback* ]] || [[ $out != *"cannot be read by this user"* ]]; then
        printf '%s\n' "$out" | tail -20 >&2
        fail "$3: exit $rc, not a refusal by name with exit 2"
    fi
    say "ok: $3: exit 2, $(printf '%s\n' "$out" | grep 'cannot be read')"
}
refused 0700 0644 "a model directory the container user cannot enter (0700)"
refused 0755 0600 "model files the container user cannot read (0600)"

say "image size: $size_text (the issue's aim for the CPU image: under 1.2 GB)"
say "passed: every check, in $((SECONDS - started)) s (build ${build_s} s)"
