#!/usr/bin/env bash
# The demo: a simulated plant (5 machines on Modbus TCP, m3 drifting towards overstrain) and the agent scoring it,
# on a plain gateway install. A live table here, the status page on http://127.0.0.1:8080; Ctrl-C stops both.
# Options go to `pdm-edge demo`, e.g. ./scripts/demo.sh --machines 8 --drift m5:HDF
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ""
exec .venv/bin/pdm-edge demo "$@"
