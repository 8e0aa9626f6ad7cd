#!/bin/sh
# Start the proxy: fill TCNSERVE_DNS_SERVER and TCNSERVE_BACKEND from the pod's resolv.conf
# when they are unset (its first nameserver; its first search domain is
# <namespace>.svc.<cluster domain>), then run the given command (haproxy ...).
set -eu
resolv="${TCNSERVE_RESOLV_CONF:-/etc/resolv.conf}"
if [ -z "${TCNSERVE_DNS_SERVER:-}" ]; then
    TCNSERVE_DNS_SERVER="$(sed -n 's/^nameserver[[:space:]]*\([^[:space:]]*\).*/\1/p' "$resolv" | head -n 1):53"
fi
if [ -z "${TCNSERVE_BACKEND:-}" ]; then
    domain="$(sed -n 's/^search[[:space:]]*\([^[:space:]]*\).*/\1/p' "$resolv" | head -n 1)"
    TCNSERVE_BACKEND="tcnserve.${domain}:${TCNSERVE_PORT:-8000}"
fi
TCNSERVE_PROXY_BIND="${TCNSERVE_PROXY_BIND:-:8080}"
export TCNSERVE_DNS_SERVER TCNSERVE_BACKEND TCNSERVE_PROXY_BIND
exec "$@"
