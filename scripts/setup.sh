#!/usr/bin/env bash
# Set up this checkout on a Debian/Ubuntu machine, as root: system packages,
# then a virtualenv in .venv with the project.  Safe to run again; it only adds
# what is missing.
#
#   bash scripts/setup.sh          what `spa-server demo` needs, and no more:
#                                  the server's libraries (.[server]), nftables,
#                                  ip netns, a real sshd and ssh
#   bash scripts/setup.sh --test   that, and the test suite's programs and tools
#                                  (.[server,test]): what scripts/test.sh needs
#
# tests/unit/test_setup_split.py checks that every program the demo runs comes
# from a package in DEMO_PACKAGES.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
case "${1:-}" in
    "") ;;
    --test) TEST=1 ;;
    *) echo "setup: error: unknown argument ${1} (use: bash scripts/setup.sh [--test])" >&2
       exit 2 ;;
esac

DEMO_PACKAGES=(
    python3 python3-venv               # the interpreter and venv
    nftables libnftables1              # the default firewall backend (in process; nft)
    iproute2 procps                    # ip netns, sysctl and kill: the demo's namespaces
    openssh-server openssh-client      # the demo's real sshd, ssh and ssh-keygen
)
TEST_PACKAGES=(
    python3-pip                        # pip for Debian's interpreter
    iptables                           # the iptables backend
    util-linux mount                   # unshare and mount --bind: a hosts file for one process
    openssl                            # a certificate for the TLS service in the tests
    nmap hydra tcpdump                 # the attacker's tools in the tests
    fail2ban                           # fail2ban-regex checks contrib/fail2ban in the tests
    ipset                              # the iptables backend counts dropped attempts in ipsets
    systemd                            # systemd-analyze verify for the unit file
    chromium chromium-driver           # a real browser for the dashboard tests (selenium)
    gcc libc6-dev                      # the live fuzz test builds benchmarks/fuzz_send.c
    fwknop-client                      # the real fwknop client knocks the compat listener
    fwknop-server                      # import-fwknop reads the access.conf Debian ships
    pipx                               # the client alone, installed as a user would
    etcd-server etcd-client            # a real etcd cluster for the group tests (etcdctl: RBAC);
                                       # where systemd runs, Debian also starts its own etcd on
                                       # 127.0.0.1:2379: the tests use none of it (namespaces)
    zsh                                # the zsh completion is run in the tests
)
APT_PACKAGES=("${DEMO_PACKAGES[@]}")
EXTRAS=server
if [ "$TEST" = 1 ]; then
    APT_PACKAGES+=("${TEST_PACKAGES[@]}")
    EXTRAS=server,test
fi

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
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
if [ "$TEST" = 1 ]; then
    echo "setup: ready for the tests (bash scripts/test.sh) and the demo (.venv/bin/spa-server demo)"
else
    echo "setup: ready for the demo (.venv/bin/spa-server demo; the tests: bash scripts/setup.sh --test)"
fi
