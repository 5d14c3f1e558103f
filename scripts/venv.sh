# shellcheck shell=bash
# Sourced by the other scripts: make .venv with a Python >= 3.11 and install the project into it.
# Usage: ensure_venv EXTRAS   (e.g. "" for the gateway agent, "dev,train" for the tests)

find_python() {
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "pdm-edge needs Python >= 3.11 (found: $(python3 --version 2>&1 || echo none))" >&2
    return 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
        echo "need root to run: $*" >&2
        return 1
    fi
}

ensure_venv() {
    local extras="$1" python
    python=$(find_python)
    if [ ! -x .venv/bin/python ]; then
        if ! "$python" -m venv .venv 2>/dev/null; then
            # Debian and Ubuntu ship venv separately.
            echo "installing python3-venv (Debian/Ubuntu)..." >&2
            as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv >/dev/null
            rm -rf .venv
            "$python" -m venv .venv
        fi
        .venv/bin/python -m pip install -q --upgrade pip
        rm -f "$INSTALL_STAMP"
    fi
    if installed "$extras"; then return 0; fi
    local target="."
    [ -n "$extras" ] && target=".[$extras]"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$target" || return
    record_install "$extras"
}

# The install is editable: a change of the code needs none, a change of pyproject.toml (dependencies, entry points,
# package data) does. .venv/.installed holds pyproject.toml's sha256 and the extras installed with it.
INSTALL_STAMP=.venv/.installed

pyproject_hash() {
    sha256sum pyproject.toml | cut -d' ' -f1
}

installed() {
    local wanted="$1" hash extras extra
    [ -f "$INSTALL_STAMP" ] || return 1
    read -r hash extras <"$INSTALL_STAMP" || return 1
    [ "$hash" = "$(pyproject_hash)" ] || return 1
    for extra in ${wanted//,/ }; do
        [[ ",$extras," == *",$extra,"* ]] || return 1
    done
}

record_install() {
    local extras="$1" hash previous=""
    if [ -f "$INSTALL_STAMP" ] && read -r hash previous <"$INSTALL_STAMP" && [ "$hash" = "$(pyproject_hash)" ]; then
        extras="$previous${previous:+${extras:+,}}$extras"
    fi
    echo "$(pyproject_hash) $extras" >"$INSTALL_STAMP"
}
