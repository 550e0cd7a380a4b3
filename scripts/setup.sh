#!/usr/bin/env bash
# Set up everything the project needs on a Debian/Ubuntu machine, as root:
# system packages, then a virtualenv in .venv with the project and its test
# tools.  Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-pip   # the interpreter and venv
    nftables libnftables1              # the default firewall backend (in process)
    iptables                           # the iptables backend
    iproute2 procps                    # ip netns and sysctl, for the namespace tests
    util-linux mount                   # unshare and mount --bind: a hosts file for one process
    openssh-server openssh-client      # a real sshd and ssh login in the tests
    openssl                            # a certificate for the TLS service in the tests
    nmap hydra tcpdump                 # the attacker's tools in the tests
    fail2ban                           # fail2ban-regex checks contrib/fail2ban in the tests
    ipset                              # the iptables backend counts dropped attempts in ipsets
    systemd                            # systemd-analyze verify for the unit file
    chromium chromium-driver           # a real browser for the dashboard tests (selenium)
    gcc libc6-dev                      # the live fuzz test builds benchmarks/fuzz_send.c
    fwknop-client                      # the real fwknop client knocks the compat listener
    fwknop-server                      # import-fwknop reads the access.conf Debian ships
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

# Debian's own interpreter: what a fresh Debian machine has, and the one we
# benchmark (docs/benchmarks.md: 1.6x faster on the receive path than a plain
# source build of the same version, side by side).
if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
real() { "$1" -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))'; }
if [ -x .venv/bin/python ] && [ "$(real .venv/bin/python)" != "$(real "$PYTHON")" ]; then
    echo "setup: .venv was made with another interpreter; making it again with $PYTHON"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[server,test]'
echo "setup: ready (.venv/bin/spa-server, .venv/bin/spa-client)"
