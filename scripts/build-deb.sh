#!/usr/bin/env bash
# A Debian package of the agent, pdm-edge_VERSION-REVISION_ARCH.deb, with Debian's own tooling (dpkg-deb): the
# program as a self-contained virtual environment in /opt/pdm-edge/venv (built with Debian 12's /usr/bin/python3,
# the interpreter it depends on), the unit, a default configuration marked as a conffile (an upgrade keeps the
# administrator's edits), and maintainer scripts (deploy/debian/) that make the user and folders, enable and start
# the service, stop it before an upgrade or removal, and remove everything on purge.
#
#   scripts/build-deb.sh [--from WHEEL] [--revision N] [--out DIR]
#
#   --from WHEEL     the project's wheel (default: built from this checkout)
#   --revision N     the Debian revision (default 1): a rebuild of the same version for an upgrade is revision 2...
#   --out DIR        where the .deb goes (default: dist/)
#   --cache DIR      keep the built virtual environment in DIR, keyed by the wheel's and PDM_PIP_ARGS's hash, and
#                    reuse it when they are the same (a second revision of the same build packs in seconds)
# Environment: PDM_PIP_ARGS (e.g. "--no-index --find-links /srv/wheels": the dependencies from a folder of wheels).
# Needs: Debian 12 (or a system with the same /usr/bin/python3, 3.11) with python3-venv and dpkg-deb; no root.
# The package is for the architecture it is built on (onnxruntime's wheels are): build on arm64 for arm64.
set -euo pipefail
umask 022
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEEL=""
REVISION=1
OUT=$REPO_DIR/dist
CACHE=""
while [ $# -gt 0 ]; do
    case "$1" in
    --from) WHEEL=$(realpath "${2:?--from needs a wheel}"); shift ;;
    --revision) REVISION=${2:?--revision needs a number}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --cache) CACHE=${2:?--cache needs a folder}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
PY=/usr/bin/python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    { echo "build-deb.sh: $PY must be Python 3.11 (Debian 12's), the interpreter the package depends on" >&2; exit 1; }
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -z "$WHEEL" ]; then
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/wheel" "$REPO_DIR"
    WHEEL=$(ls "$WORK"/wheel/pdm_edge-*.whl)
fi
VERSION=$(basename "$WHEEL" | cut -d- -f2)
STAGE=$WORK/root
VENV=/opt/pdm-edge/venv
echo "build-deb.sh: pdm-edge $VERSION-$REVISION ($ARCH) from $(basename "$WHEEL")" >&2
KEY=$( (sha256sum "$WHEEL" | cut -d' ' -f1; echo "${PDM_PIP_ARGS:-}"; "$PY" --version) | sha256sum | cut -c1-16)
if [ -n "$CACHE" ] && [ -d "$CACHE/venv-$KEY" ]; then
    mkdir -p "$STAGE/opt/pdm-edge"
    cp -a "$CACHE/venv-$KEY" "$STAGE$VENV"
    echo "build-deb.sh: the virtual environment of an earlier build of the same wheel ($CACHE/venv-$KEY)" >&2
else
    "$PY" -m venv "$STAGE$VENV"
    # shellcheck disable=SC2086  # PDM_PIP_ARGS is a list of arguments
    "$STAGE$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-compile \
        ${PDM_PIP_ARGS:-} "$WHEEL"
    PYTHONDONTWRITEBYTECODE=1 "$STAGE$VENV/bin/pdm-edge" model verify >&2
    # the runtime needs neither pip nor setuptools
    "$STAGE$VENV/bin/python" -m pip uninstall --quiet --yes pip setuptools
    # the venv was made under the staging folder: its scripts and pyvenv.cfg name it; they must name /opt/pdm-edge/venv
    grep -rlF "$STAGE$VENV" "$STAGE$VENV/bin" "$STAGE$VENV/pyvenv.cfg" | while read -r file; do
        sed -i "s|$STAGE$VENV|$VENV|g" "$file"
    done
    # byte-code compiled now, recording the installed paths (the service cannot write /opt, and purge removes all)
    "$PY" -m compileall -q -j 0 -s "$STAGE" -p / "$STAGE$VENV/lib" >/dev/null
    if [ -n "$CACHE" ]; then
        mkdir -p "$CACHE"
        rm -rf "$CACHE"/venv-*
        cp -a "$STAGE$VENV" "$CACHE/venv-$KEY"
    fi
fi
install -D -m 0644 "$REPO_DIR/systemd/pdm-edge.service" "$STAGE/lib/systemd/system/pdm-edge.service"
install -D -m 0640 "$REPO_DIR/deploy/debian/agent.toml" "$STAGE/etc/pdm-edge/agent.toml"
install -d -m 0755 "$STAGE/usr/bin"
ln -s "$VENV/bin/pdm-edge" "$STAGE/usr/bin/pdm-edge"
for doc in DEPLOYMENT.md PRODUCTION_CHECKLIST.md README.md; do
    install -D -m 0644 "$REPO_DIR/$doc" "$STAGE/opt/pdm-edge/doc/$doc"
done
install -m 0644 "$REPO_DIR/examples/agent.toml" "$STAGE/opt/pdm-edge/doc/agent.toml.example"
install -d -m 0755 "$STAGE/DEBIAN"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION-$REVISION/" -e "s/@ARCH@/$ARCH/" -e "s/@SIZE@/$SIZE/" \
    "$REPO_DIR/deploy/debian/control" >"$STAGE/DEBIAN/control"
install -m 0644 "$REPO_DIR/deploy/debian/conffiles" "$STAGE/DEBIAN/conffiles"
for script in postinst prerm postrm; do install -m 0755 "$REPO_DIR/deploy/debian/$script" "$STAGE/DEBIAN/$script"; done
mkdir -p "$OUT"
DEB=$OUT/pdm-edge_$VERSION-${REVISION}_$ARCH.deb
dpkg-deb --root-owner-group -Zgzip -z6 --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
