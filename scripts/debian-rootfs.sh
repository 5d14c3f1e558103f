#!/usr/bin/env bash
# A Debian bookworm root file system made from Debian's packages with debootstrap, cached outside the repository
# (no image registry is reachable on the test machines, so neither python:3.11-slim-bookworm nor debian:12 can be
# pulled). Prints the path of the cached tarball; with --image NAME also imports it into podman as NAME (unless an
# image of that name made from the same tarball is there already) and prints NAME instead.
#
#   scripts/debian-rootfs.sh python [amd64|arm64]            Python 3.11 from Debian: the images' PYTHON_IMAGE, the
#                                                            arm64 chroot
#   scripts/debian-rootfs.sh systemd [amd64] [--image NAME]   + systemd as init, dbus, PostgreSQL 15, sudo: the
#                                                            "gateway" and "central server" of the systemd tests
#
# Cache: ${PDM_CACHE:-~/.cache/pdm-edge}/rootfs/ (tarballs, named by the flavour, the architecture and a hash of
# the package list) and .../debs/ARCH (debootstrap's downloaded packages, shared by the flavours). Building one
# takes from 1 to 13 minutes (the download); a warm cache answers at once. Needs root (debootstrap, chroot).
set -euo pipefail
FLAVOUR=${1:?usage: debian-rootfs.sh python|systemd [amd64|arm64] [--image NAME]}
shift
ARCH=$(dpkg --print-architecture)
IMAGE=""
while [ $# -gt 0 ]; do
    case "$1" in
    amd64 | arm64) ARCH=$1 ;;
    --image) IMAGE=${2:?--image needs a name}; shift ;;
    *) echo "debian-rootfs.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
MIRROR=${PDM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${PDM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pdm-edge}
BASE=python3,python3-venv,ca-certificates,tzdata
case "$FLAVOUR" in
python) PACKAGES=$BASE ;;
systemd) PACKAGES=$BASE,systemd,systemd-sysv,dbus,libpam-systemd,procps,sudo,postgresql,postgresql-contrib,locales ;;
*) echo "debian-rootfs.sh: flavour python or systemd, not $FLAVOUR" >&2; exit 2 ;;
esac
REV=3
[ "$FLAVOUR" != python ] || REV=4 # trimmed like the slim images
KEY=$(printf '%s %s %s %s' "$FLAVOUR" "$ARCH" "$PACKAGES" "$REV" | sha256sum | cut -c1-12)
TARBALL=$CACHE/rootfs/bookworm-$FLAVOUR-$ARCH-$KEY.tar

if [ ! -s "$TARBALL" ]; then
    command -v debootstrap >/dev/null || { echo "debian-rootfs.sh: debootstrap is missing (scripts/deploy-tools.sh)" >&2; exit 1; }
    mkdir -p "$CACHE/rootfs" "$CACHE/debs/$ARCH"
    WORK=$(mktemp -d "$CACHE/rootfs/build.XXXXXX")
    trap 'umount -R "$WORK/root/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT
    echo "debian-rootfs.sh: debootstrap bookworm $FLAVOUR $ARCH (cached in $CACHE; a few minutes, once)..." >&2
    debootstrap --arch="$ARCH" --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs/$ARCH" \
        bookworm "$WORK/root" "$MIRROR" >"$WORK/log" 2>&1 || { tail -30 "$WORK/log" >&2; exit 1; }
    R=$WORK/root
    ln -sf python3 "$R/usr/bin/python"
    printf 'deb %s bookworm main\n' "$MIRROR" >"$R/etc/apt/sources.list"
    echo pdm-test >"$R/etc/hostname"
    if [ "$FLAVOUR" = systemd ]; then
        # UTF-8 by default (initdb takes its encoding from the locale: C would make a SQL_ASCII cluster)
        echo 'en_US.UTF-8 UTF-8' >"$R/etc/locale.gen" && chroot "$R" locale-gen >/dev/null
        echo 'LANG=en_US.UTF-8' >"$R/etc/default/locale"
        # a container has no consoles, udev or hardware clock to wait for
        for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-hwdb-update.service systemd-modules-load.service sys-kernel-config.mount \
            systemd-remount-fs.service; do
            ln -sf /dev/null "$R/etc/systemd/system/$unit"
        done
        # PostgreSQL's default cluster again, in UTF-8 (debootstrap made it with the C locale)
        chroot "$R" pg_dropcluster 15 main >/dev/null 2>&1 || true
        chroot "$R" env LANG=en_US.UTF-8 pg_createcluster --locale en_US.UTF-8 --port 5432 15 main >/dev/null
    fi
    if [ "$FLAVOUR" = python ]; then
        # as python:3.11-slim-bookworm: no documentation, manual pages or translations, now or from later packages
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
            >"$R/etc/dpkg/dpkg.cfg.d/slim"
        find "$R/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
        rm -rf "$R"/usr/share/man/* "$R"/usr/share/info/* "$R"/usr/share/locale/*
    fi
    rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/tmp/* "$R"/var/log/*.log
    : >"$R/etc/machine-id"
    tar -C "$R" --numeric-owner -cf "$TARBALL.part" .
    mv "$TARBALL.part" "$TARBALL"
    for stale in "$CACHE/rootfs/bookworm-$FLAVOUR-$ARCH"-*.tar; do # earlier package lists' tarballs
        [ "$stale" = "$TARBALL" ] || rm -f "$stale"
    done
    echo "debian-rootfs.sh: $TARBALL ($(du -h "$TARBALL" | cut -f1))" >&2
fi
if [ -z "$IMAGE" ]; then
    echo "$TARBALL"
    exit 0
fi
if [ "$(podman image inspect --format '{{index .Labels "pdm.rootfs"}}' "$IMAGE" 2>/dev/null)" != "$KEY" ]; then
    case "$FLAVOUR" in
    systemd) CHANGES=(--change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3') ;;
    *) CHANGES=(--change 'CMD ["/usr/bin/python3"]') ;;
    esac
    OLD=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    podman import --quiet "${CHANGES[@]}" --change "LABEL pdm.rootfs=$KEY" --change 'ENV LANG=C.UTF-8' \
        "$TARBALL" "$IMAGE" >/dev/null
    # the image it replaces, by its id (never a prune: other images on this engine are not ours)
    if [ -n "$OLD" ]; then podman rmi "$OLD" >/dev/null 2>&1 || true; fi
fi
echo "$IMAGE"
