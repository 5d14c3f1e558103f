#!/usr/bin/env bash
# The product's main job today: score machine readings with the shipped model, on a plain gateway install.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ""
.venv/bin/pdm-edge model info
echo
echo "scoring examples/readings.jsonl (one JSON result per reading):"
.venv/bin/pdm-edge model score < "${1:-examples/readings.jsonl}"
