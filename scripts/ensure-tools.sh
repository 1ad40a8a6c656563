#!/bin/sh
# Installs the system tools the test suite needs but pip cannot: headless Chromium for the HTML report test
# (tests/integration/test_report_browser.py). Idempotent: does nothing when `chromium` is already on PATH.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tools: chromium is missing and apt-get is not available; install Chromium by hand" >&2
    exit 1
fi
# apt-get needs root: use sudo when we are not root and it exists.
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
command -v chromium >/dev/null 2>&1
