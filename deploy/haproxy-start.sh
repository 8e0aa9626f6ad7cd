#!/bin/sh
# Start the proxy: fill TCNSERVE_DNS_SERVER, TCNSERVE_PODS and TCNSERVE_POD_PORT from the pod's
# resolv.conf when they are unset (its first nameserver; its first search domain is
# <namespace>.svc.<cluster domain>, under which the StatefulSet's pods are named
# tcnserve-<n>.tcnserve), then run the given command (haproxy ...).
set -eu
resolv="${TCNSERVE_RESOLV_CONF:-/etc/resolv.conf}"
if [ -z "${TCNSERVE_DNS_SERVER:-}" ]; then
    TCNSERVE_DNS_SERVER="$(sed -n 's/^nameserver[[:space:]]*\([^[:space:]]*\).*/\1/p' "$resolv" | head -n 1):53"
fi
if [ -z "${TCNSERVE_PODS:-}" ]; then
    domain="$(sed -n 's/^search[[:space:]]*\([^[:space:]]*\).*/\1/p' "$resolv" | head -n 1)"
    TCNSERVE_PODS="tcnserve.${domain}"
fi
TCNSERVE_POD_PORT="${TCNSERVE_POD_PORT:-8000}"
TCNSERVE_PROXY_BIND="${TCNSERVE_PROXY_BIND:-:8080}"
export TCNSERVE_DNS_SERVER TCNSERVE_PODS TCNSERVE_POD_PORT TCNSERVE_PROXY_BIND
exec "$@"
