#!/usr/bin/env bash
# Fetch the bundled datasets into .cache/data (pinned versions, sha256-checked); the pins and steps are in
# data/fetch.py. Idempotent: a second run only re-checks the hashes. `--verify-only` fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -I data/fetch.py "$@"
