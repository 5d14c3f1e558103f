#!/usr/bin/env bash
# Build the two images: pdm-edge (the gateway agent, ./Dockerfile) and pdm-central (the central API,
# central/Dockerfile), with Docker or podman, and print their sizes.
#
#   scripts/images.sh [--tag VERSION] [--python-image IMAGE | --local-base] [--engine docker|podman]
#
#   --tag VERSION       the images' tag (default: the project's version from pyproject.toml)
#   --python-image IMG  the Dockerfiles' PYTHON_IMAGE (default python:3.11-slim-bookworm)
#   --local-base        no image registry reachable: make the base from Debian 12's packages instead
#                       (scripts/debian-rootfs.sh: debootstrap, Python 3.11 from Debian, cached in ~/.cache/pdm-edge;
#                       the same Debian release and Python minor as python:3.11-slim-bookworm); needs root
#   --engine ENGINE     docker or podman (default: podman when installed, else docker)
#   --ca-bundle FILE    podman only: a CA bundle the build steps trust for PyPI (a TLS-inspecting proxy's; default
#                       $PIP_CERT when set), mounted during the build, never kept in the images
# podman builds with --format docker: the OCI format would drop the images' HEALTHCHECK.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
BASE=python:3.11-slim-bookworm
LOCAL_BASE=0
ENGINE=""
CA_BUNDLE=${PIP_CERT:-}
while [ $# -gt 0 ]; do
    case "$1" in
    --tag) TAG=${2:?--tag needs a version}; shift ;;
    --python-image) BASE=${2:?--python-image needs an image}; shift ;;
    --local-base) LOCAL_BASE=1 ;;
    --engine) ENGINE=${2:?--engine needs docker or podman}; shift ;;
    --ca-bundle) CA_BUNDLE=${2:?--ca-bundle needs a file}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "images.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$ENGINE" ]; then
    if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=docker; fi
fi
FORMAT=()
if [ "$ENGINE" = podman ]; then
    FORMAT=(--format docker)
    if [ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ]; then
        PIP_CONF=$(mktemp)
        trap 'rm -f "$PIP_CONF"' EXIT
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$PIP_CONF"
        chmod 0644 "$PIP_CONF"
        FORMAT+=(--volume "$(realpath "$CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro"
            --volume "$PIP_CONF:/etc/pip.conf:ro")
    fi
fi
if [ "$LOCAL_BASE" = 1 ]; then
    BASE=$(bash scripts/debian-rootfs.sh python --image localhost/pdm-python:3.11-bookworm)
fi
for image in pdm-edge:Dockerfile pdm-central:central/Dockerfile; do
    name=${image%%:*}
    started=$(date +%s)
    echo "images.sh: building $name:$TAG on $BASE with $ENGINE..." >&2
    "$ENGINE" build "${FORMAT[@]}" --build-arg "PYTHON_IMAGE=$BASE" -f "${image#*:}" -t "$name:$TAG" . >&2
    size=$("$ENGINE" image inspect --format '{{.Size}}' "$name:$TAG")
    echo "$name:$TAG $((size / 1000000)) MB, built in $(($(date +%s) - started)) s"
done
