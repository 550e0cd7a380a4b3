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
# CPU (tests/unit, tests/property: about 3 minutes of one core) beside the
# ones that mostly wait on the kernel, daemons and timers (the rest: load
# average about 0.35 on two cores).  One process took 19-20 minutes of the
# 20 CI allows; side by side the CPU half ends inside the other.  The CPU
# half's output is printed after the other's; either failing fails the run.
# It leaves the directory modes alone (SPA_TESTS_KEEP_MODES, tests/conftest.py):
# the kernel half gives the daemon's user its search permission and puts the
# modes back only when it ends.
# Its temporary directories are its own (--basetemp): pytest makes
# /tmp/pytest-of-root 0700 again when a session starts, which took the
# daemon's user's search permission from the other half's directories.
cpu_dir=$(mktemp -d)
cpu_log="$cpu_dir/log"
trap 'rm -rf "$cpu_dir"' EXIT
echo "== pytest, in two processes (hypothesis profile: $HYPOTHESIS_PROFILE)"
SPA_TESTS_KEEP_MODES=1 "${pytest[@]}" --basetemp="$cpu_dir/tmp" tests/unit tests/property \
    >"$cpu_log" 2>&1 &
cpu_pid=$!
kernel_rc=0
"${pytest[@]}" tests --ignore=tests/unit --ignore=tests/property || kernel_rc=$?
cpu_rc=0
wait "$cpu_pid" || cpu_rc=$?
echo "== pytest tests/unit tests/property (ran beside the above)"
cat "$cpu_log"
if [ "$kernel_rc" -ne 0 ] || [ "$cpu_rc" -ne 0 ]; then
    echo "test: failed (kernel half: exit $kernel_rc, CPU half: exit $cpu_rc)" >&2
    exit 1
fi
