#!/usr/bin/env bash
# Run a command while N busy loops (default: one per CPU) keep every CPU
# busy, the way a shared CI machine is: the test suite must pass like this.
#   scripts/busy.sh make test
#   BUSY=1 scripts/busy.sh .venv/bin/python -m pytest tests/test_e2e.py
set -uo pipefail
n="${BUSY:-$(nproc)}"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT INT TERM
for _ in $(seq "$n"); do
    ( while :; do :; done ) &
    pids+=($!)
done
echo "[busy] $n busy loops (pids ${pids[*]}) while: $*" >&2
"$@"
rc=$?
echo "[busy] '$*' exited $rc" >&2
exit $rc
