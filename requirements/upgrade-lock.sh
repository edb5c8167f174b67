#!/usr/bin/env bash
# `make upgrade-lock`: move the dependency lock forward deliberately.
#
# 1. A scratch venv (.venv-upgrade) gets the newest release of every dependency pyproject.toml allows.
# 2. Its versions are written to a candidate lock and compared with the current one (printed).
# 3. Lint and the whole suite run in that venv, against the candidate (MMICT_LOCK points the lock test at it).
# 4. Only if both pass is the candidate copied over the lock. Otherwise the lock stays, and the failures and
#    the versions that would have changed are printed, so the breaking upgrade can be found and fixed first.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK="${1:-requirements/lock.txt}"
VENV="${UPGRADE_VENV:-.venv-upgrade}"
PY="$VENV/bin/python"
CANDIDATE="$VENV/lock.candidate.txt"
quiet() { grep -v -e "is ignored: it is neither a file nor a directory" -e "BuildBackendWarning" || true; }

rm -rf "$VENV"
python3 -m venv "$VENV"
echo "resolving the newest versions into $VENV"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel 2>&1 | quiet
"$PY" -m pip install -q --disable-pip-version-check --upgrade --no-build-isolation -e ".[dev]" 2>&1 | quiet
"$PY" -m mmict.dependency_lock write --python "$PY" --out "$CANDIDATE" >/dev/null
echo "changes against $LOCK:"
if [ -f "$LOCK" ]; then "$PY" -m mmict.dependency_lock diff "$LOCK" "$CANDIDATE"; else echo "(no lock yet)"; fi

status=0
"$VENV/bin/ruff" check . || status=$?
if [ "$status" -eq 0 ]; then
    MMICT_LOCK="$CANDIDATE" WANDB_MODE=disabled "$PY" -m pytest -q -p no:cacheprovider || status=$?
fi
if [ "$status" -ne 0 ]; then
    echo "upgrade-lock: lint or tests FAILED with the newest versions (above); $LOCK is unchanged." >&2
    echo "Fix the code (or cap the offending package in pyproject.toml), then run make upgrade-lock again." >&2
    exit "$status"
fi
"$PY" -m mmict.dependency_lock write --python "$PY" --out "$LOCK"
echo "upgrade-lock: lint and tests passed; $LOCK rewritten. make install (next make train/test) syncs .venv to it."
