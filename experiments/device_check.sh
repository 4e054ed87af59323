#!/usr/bin/env bash
# The prepared accelerator check (experiments/device_check.py): run as is on
# a machine lent a GPU, from a copy of the repository with nothing installed:
#
#   bash experiments/device_check.sh [device_check.py options]
#
# Makes a venv (.device-venv/, ignored) with the newest Python >= 3.11 found
# (falls back to that Python itself when venv is missing), then runs
# device_check.py in it, the whole under `timeout` (DEVICE_CHECK_TIMEOUT,
# 470 s: a session's 8 minutes). The JSON goes to $OUT/device_check.json
# ($OUT set), else experiments/results/device_check.json; it is rewritten
# after every step, so a run cut short keeps what finished.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
start=$SECONDS
PY=""
for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY=$(command -v "$candidate"); break
  fi
done
if [ -z "$PY" ]; then
  echo "device_check.sh: no Python >= 3.11 on PATH (setup.py's python_requires)" >&2
  mkdir -p "${OUT:-experiments/results}"
  printf '{"steps": [{"name": "python", "status": "failed", "reason": "no Python >= 3.11 on PATH"}]}\n' \
    > "${OUT:-experiments/results}/device_check.json"
  exit 1
fi
if [ -x .device-venv/bin/python ] || "$PY" -m venv .device-venv; then
  PY=.device-venv/bin/python
  "$PY" -m pip --version >/dev/null 2>&1 || echo "device_check.sh: the venv has no pip" >&2
else
  echo "device_check.sh: $PY -m venv failed; installing into $PY itself" >&2
fi
limit=${DEVICE_CHECK_TIMEOUT:-470}
left=$(( limit - (SECONDS - start) ))
budget=$(( left - 15 ))
exec timeout --kill-after=5 "$left" "$PY" experiments/device_check.py --budget "$budget" "$@"
