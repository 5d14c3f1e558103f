#!/usr/bin/env bash
# The deployment tests at their full level (PDM_DEPLOY_TESTS=full, tests/deploy/engine.py): besides the default
# level's systemd and .deb tests, both images built with podman on a Debian base (scripts/images.sh --local-base),
# the agent container, the Compose stack with podman-compose, and arm64 under emulation. About 13 minutes warm;
# the first run on a machine also debootstraps the bases and downloads the wheels (up to 30 minutes). Runs as root
# (debootstrap, chroot, systemd in containers). Extra arguments go to pytest. Also part of ./scripts/reliability.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PDM_DEPLOY_TESTS=full
exec ./scripts/test.sh -s -q tests/deploy "$@"
