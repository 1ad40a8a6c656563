#!/bin/sh
# Installs Prometheus (`prometheus` and `promtool`, Debian's package) for tests/integration/test_prometheus.py: a
# real Prometheus scrapes a worker and the exporter, and promtool checks deploy/prometheus/. Idempotent: does
# nothing when both are already on PATH. The package's own service is not started (no systemd here; the test
# starts its own Prometheus on a free port).
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: prometheus/promtool are missing and apt-get is not available; install Prometheus by hand" >&2
    exit 1
fi
# apt-get needs root: use sudo when we are not root and it exists.
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
# Another apt-get may hold the lock for a while (CI installing something else): wait for it rather than fail.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    prometheus
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
