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
echo "== pytest (hypothesis profile: $HYPOTHESIS_PROFILE)"
.venv/bin/python -m pytest -p no:cacheprovider "$@"
