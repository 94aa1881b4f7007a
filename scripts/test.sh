#!/usr/bin/env bash
# Install meshgate with its test dependencies into .venv and run every check:
# ruff, mypy and the whole pytest suite (which uses the real SmolLM2 model).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k tunnel -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test
./scripts/fetch_model.sh >/dev/null
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
