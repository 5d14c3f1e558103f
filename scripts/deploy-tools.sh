#!/usr/bin/env bash
# The tools of the deployment tests (tests/deploy), from Debian's packages when missing: podman with runc (crun fails
# on this kind of machine: cgroups in hybrid mode), podman-compose, debootstrap (the test images' and the systemd
# container's base), qemu-user-static with binfmt-support (arm64 under emulation), and dpkg-dev (dpkg-deb).
# Also writes /etc/containers/containers.conf from deploy/containers.conf when it has none of its own (runc, no
# default ulimits: a sandbox without CAP_SYS_RESOURCE cannot raise RLIMIT_NOFILE). Never starts a service.
# Called by scripts/test.sh; safe to run again (does nothing when everything is there). A failure is not fatal
# to the caller: the tests that need a missing tool are then skipped with the reason.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source scripts/venv.sh

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v podman-compose >/dev/null 2>&1 || missing+=(podman-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static binfmt-support)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg-dev)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables) # netavark, podman's networks
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} (Debian/Ubuntu) for the deployment tests..." >&2
    if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" uidmap slirp4netns fuse-overlayfs netavark aardvark-dns \
        >/dev/null; }; then
        echo "deploy-tools: could not install ${missing[*]}" >&2
        exit 1
    fi
fi
if [ ! -e /etc/containers/containers.conf ] && [ "$(id -u)" = 0 ]; then
    install -D -m 0644 deploy/containers.conf /etc/containers/containers.conf
fi
# binfmt handlers for arm64 (binfmt-support registers them on install; again here after a reboot)
if [ -x /usr/bin/qemu-aarch64-static ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ "$(id -u)" = 0 ]; then
    command -v update-binfmts >/dev/null 2>&1 && update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
# The systemd tests' base image (a debootstrapped Debian 12 with systemd and PostgreSQL), built here once rather than
# inside a test: cold, 1.5 to 13 minutes (the download); warm, nothing. Cached in ~/.cache/pdm-edge.
if [ "${PDM_DEPLOY_TESTS:-default}" != off ] && [ "$(id -u)" = 0 ] && command -v podman >/dev/null 2>&1; then
    bash scripts/debian-rootfs.sh systemd --image localhost/pdm-test-systemd:bookworm >/dev/null ||
        echo "deploy-tools: the systemd test image could not be built (the tests will say why)" >&2
fi
exit 0
