#!/usr/bin/env bash
# Set up everything the project needs on a Debian/Ubuntu machine, as root:
# system packages, then a virtualenv in .venv with the project and its test
# tools.  Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-pip   # the interpreter and venv
    iproute2                           # ip netns, for the namespace tests
)

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
    else
        echo "setup: not root, skipping apt packages (${APT_PACKAGES[*]})" >&2
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[server,test]'
echo "setup: ready (.venv/bin/spa-server, .venv/bin/spa-client)"
