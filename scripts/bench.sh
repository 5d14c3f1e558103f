#!/usr/bin/env bash
# The whole benchmark suite: every bench in turn, then BENCHMARKS.md regenerated (machine, goals, plots, sections).
# Usage: ./scripts/bench.sh [--quick] [--only NAME ...]   (--quick: a few minutes; the full suite: about 65 minutes on
# 2 cores, 30 of them central_scale's two 10-minute runs at fleet rate, 7 the peer's)
# Needs Mosquitto (installed when missing, never started as a service) and PostgreSQL on 127.0.0.1:5432 (else a
# throwaway one from the dev extra). The full mode also creates .bench/peer-venv with the ThingsBoard IoT Gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "central,dev"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian/Ubuntu)..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq mosquitto >/dev/null
fi
exec .venv/bin/python -m bench "$@"
