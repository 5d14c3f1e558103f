#!/usr/bin/env bash
# The whole test suite, in .venv with the dev and train extras. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "dev,train"
exec .venv/bin/python -m pytest "$@"
