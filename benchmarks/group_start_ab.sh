#!/bin/bash
# A member's start at 10^5 clients, two commits side by side (issue 18):
# benchmarks/group_scale.py --start-only of BASE and of HEAD (each from its own
# `git archive` of spa/ and benchmarks/ in a temporary directory, run with this
# checkout's .venv), alternating, RUNS times each; prints each run's lines at
# the member's start (the "after" rows are the member as each commit has it).
#
#   bash benchmarks/group_start_ab.sh [BASE [RUNS [CLIENTS]]]   # defaults: main 3 100000
set -euo pipefail
base=${1:-main}
runs=${2:-3}
clients=${3:-100000}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for who in base head; do
  mkdir "$tmp/$who"
done
git archive "$base" spa benchmarks | tar -x -C "$tmp/base"
git archive HEAD spa benchmarks | tar -x -C "$tmp/head"
echo "base $(git rev-parse --short "$base"), head $(git rev-parse --short HEAD)"
for i in $(seq "$runs"); do
  for who in base head; do
    echo "=== $who run $i $(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg)"
    .venv/bin/python "$tmp/$who/benchmarks/group_scale.py" --clients "$clients" --start-only \
      | grep -E "before:|after:" || true
  done
done
