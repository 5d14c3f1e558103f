#!/usr/bin/env bash
# The whole test suite, in .venv with the dev and train extras. Extra arguments go to pytest.
# The MQTT tests start their own throwaway brokers: Mosquitto is installed when missing, its service never started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "dev,train"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian/Ubuntu)..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq mosquitto >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
