#!/usr/bin/env bash
# Install everything, then run the CPU test suite. pytest's "no tests collected" (exit 5) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
export OMP_NUM_THREADS=1
python3 -m pytest -m "not gpu" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
