#!/usr/bin/env bash
# What the benchmarks need beyond scripts/setup.sh --test, as root: fwknop (the
# server we measure ourselves against, and its client) and gcc with the C
# library headers (benchmarks/flood.c, the traffic generator).  Debian's
# fwknop-server package does not start a daemon on its own
# (/etc/default/fwknop-server: START_DAEMON="no"); the benchmarks run their
# own fwknopd inside network namespaces they create.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends fwknop-server fwknop-client gcc libc6-dev >/dev/null
echo "benchmarks: ready (fwknopd $(fwknopd --version 2>&1 | head -1 | awk '{print $NF}'), $(gcc --version | head -1))"
