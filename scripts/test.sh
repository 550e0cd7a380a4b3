#!/usr/bin/env bash
# The whole test suite: lint, types, then every test with the CI hypothesis
# profile (thousands of examples for the fuzz and round-trip properties).
# Extra arguments go to pytest, e.g. scripts/test.sh -k replay
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}

if [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/pytest ]; then
    echo "test: error: the test tools are not installed: run bash scripts/setup.sh --test" >&2
    exit 2
fi

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy
pytest=(.venv/bin/python -m pytest -p no:cacheprovider)
if [ $# -gt 0 ]; then
    echo "== pytest (hypothesis profile: $HYPOTHESIS_PROFILE)"
    exec "${pytest[@]}" "$@"
fi

# The whole suite in two processes side by side: the tests that need only a
# CPU (tests/unit, tests/property: about 5 minutes of one core), and the
# tests that mostly sleep (the 100 s idle server; a group claim's ~45 s
# lifetime, on an etcd cluster of its own; the privilege-separation attacks,
# ~2 minutes of waiting for grants to end), beside the ones that mostly wait
# on the kernel, daemons and timers (the rest: load average about 0.35 on two
# cores).  One process took 19-20 minutes of the 20 CI allows.  The first
# half's output is printed after the other's; either failing fails the run.
#
# As root the daemons run as a service user (nobody here) that imports from
# this checkout's .venv: the checkout's ancestors get the search permission
# (x) here, for both processes, and their modes back when both have ended
# (tests/conftest.py does this itself in a single process).  Each process has
# its own temporary directories: pytest makes /tmp/pytest-of-root 0700 when a
# session starts, which would take the permission from the other's.  Each
# prints its slowest tests (--durations): the second process is the run's
# length, and the list says which test to move when it grows.
restore=()
directory=$PWD/.venv/bin
while :; do
    mode=$(stat -c %a "$directory")
    if (( (8#$mode & 1) == 0 )); then
        restore+=("$mode:$directory")
        chmod o+x "$directory"
    fi
    [ "$directory" = / ] && break
    directory=$(dirname "$directory")
done
first_dir=$(mktemp -d)
cleanup() {
    local item
    for item in "${restore[@]}"; do chmod "${item%%:*}" "${item#*:}"; done
    rm -rf "$first_dir"
}
trap cleanup EXIT
export SPA_TESTS_ANCESTORS_SEARCHABLE=1
first=(tests/unit tests/property tests/netns/test_silence.py
       tests/netns/test_group_claim_lifetime.py tests/netns/adversary/test_privsep_attacks.py)
echo "== pytest, in two processes (hypothesis profile: $HYPOTHESIS_PROFILE)"
"${pytest[@]}" --durations=15 --basetemp="$first_dir/tmp" "${first[@]}" >"$first_dir/log" 2>&1 &
first_pid=$!
kernel_rc=0
"${pytest[@]}" --durations=40 tests --ignore=tests/unit --ignore=tests/property \
    --ignore=tests/netns/test_silence.py --ignore=tests/netns/test_group_claim_lifetime.py \
    --ignore=tests/netns/adversary/test_privsep_attacks.py || kernel_rc=$?
cpu_rc=0
wait "$first_pid" || cpu_rc=$?
echo "== pytest ${first[*]} (ran beside the above)"
cat "$first_dir/log"
if [ "$kernel_rc" -ne 0 ] || [ "$cpu_rc" -ne 0 ]; then
    echo "test: failed (the second process: exit $kernel_rc, the first: exit $cpu_rc)" >&2
    exit 1
fi
