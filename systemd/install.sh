#!/usr/bin/env bash
# Install, upgrade, roll back or remove pdm-edge (the gateway agent) or, with --central, pdm-central (the central
# API) on Debian or Ubuntu, from a checkout or a wheel. Safe to run again: a second install changes nothing.
#
#   systemd/install.sh [--from CHECKOUT|WHEEL] [--config FILE] [--gateway-id ID]   install (default)
#   systemd/install.sh --upgrade [--from ...]      new release beside the running one, switch, migrate, restart
#   systemd/install.sh --rollback                  back to the release before the last upgrade
#   systemd/install.sh --uninstall [--purge]       remove the program; --purge also config, data, secrets, user
#
# Options:
#   --central          the central API (pdm-central, extra `central`) instead of the gateway agent
#   --from PATH        a checkout (a folder with pyproject.toml) or a wheel; default: the checkout holding this script
#   --config FILE      install FILE as the configuration if there is none yet (agent.toml, or central.env)
#   --gateway-id ID    gateway_id of a configuration made from the example (default: the short host name)
#   --no-start         install and enable, do not start
#   --root DIR         act on DIR as the file system root (also PDM_ROOT): every file goes under DIR, and what would
#                      change the running system (useradd, chown, systemctl start...) is printed as "would run: ..."
#                      instead of being run; units are enabled with `systemctl --root`. Needs no root privileges.
#   --python PATH      the Python (>= 3.11) of the virtual environment (also PDM_PYTHON)
# Environment: PDM_PIP_ARGS (e.g. "--no-index --find-links /srv/wheels" on a gateway without Internet access),
#   PDM_SYSTEMD_VERSION (pretend this systemd version when choosing drop-ins), PDM_SETTLE_S (seconds a restarted
#   service must stay up after an upgrade, default 15).
#
# Layout (agent; central likewise with pdm-central):
#   /opt/pdm-edge/releases/<version>-<time>/   one virtual environment per release
#   /opt/pdm-edge/venv -> releases/...         the running release; venv.prev: the one before (for --rollback)
#   /usr/local/bin/pdm-edge -> /opt/pdm-edge/venv/bin/pdm-edge
#   /etc/pdm-edge/agent.toml                   configuration, root:pdm-edge 0640, never overwritten
#   /etc/credstore/pdm-edge.<credential>       secrets, root 0600 (central.token, status.token, mqtt.password)
#   /var/lib/pdm-edge/                         the SQLite buffer, pdm-edge 0750, kept by --uninstall
#   /var/backups/pdm-edge/                     the buffer as it was before each upgrade, root 0700
#   /etc/systemd/system/pdm-edge.service       the unit (+ pdm-edge.service.d/10-backoff.conf on systemd >= 254)
#   (central also pdm-central-notify.service, the notification worker, which pdm-central.service starts and stops)
#
# Exit codes: 0 done; 1 failed (nothing half-done is left running: a failed upgrade is rolled back); 2 usage;
# 3 installed and enabled but not started: the configuration needs attention (the message says what).
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

ROOT=${PDM_ROOT:-/}
ACTION=install
COMPONENT=agent
SOURCE=""
CONFIG_FROM=""
GATEWAY_ID=""
START=1
PURGE=0
PYTHON=${PDM_PYTHON:-}
SETTLE_S=${PDM_SETTLE_S:-15}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

say() { printf 'pdm-install: %s\n' "$*" >&2; }
# Temporary files and folders (copies of credentials among them): removed however the script ends, Ctrl-C included.
TEMPORARY=()
temporary() { # variable [mktemp options]: a new temporary path into the variable, remembered for removal
    local path
    path=$(mktemp "${@:2}")
    TEMPORARY+=("$path")
    printf -v "$1" '%s' "$path"
}
remove_temporary() { [ "${#TEMPORARY[@]}" = 0 ] || rm -rf -- "${TEMPORARY[@]}"; }
trap remove_temporary EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
die() {
    say "error: $*"
    exit 1
}
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
    --root) ROOT=${2:?--root needs a folder}; shift ;;
    --root=*) ROOT=${1#*=} ;;
    --from) SOURCE=${2:?--from needs a path}; shift ;;
    --from=*) SOURCE=${1#*=} ;;
    --config) CONFIG_FROM=${2:?--config needs a file}; shift ;;
    --config=*) CONFIG_FROM=${1#*=} ;;
    --gateway-id) GATEWAY_ID=${2:?--gateway-id needs a name}; shift ;;
    --gateway-id=*) GATEWAY_ID=${1#*=} ;;
    --python) PYTHON=${2:?--python needs a path}; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --central) COMPONENT=central ;;
    --upgrade) ACTION=upgrade ;;
    --rollback) ACTION=rollback ;;
    --uninstall) ACTION=uninstall ;;
    --purge) PURGE=1 ;;
    --no-start) START=0 ;;
    -h | --help) usage 0 ;;
    *)
        say "unknown argument: $1"
        usage 2 >&2
        ;;
    esac
    shift
done
[ "$PURGE" = 0 ] || [ "$ACTION" = uninstall ] || {
    say "--purge goes with --uninstall"
    exit 2
}

case "$COMPONENT" in
agent)
    NAME=pdm-edge
    EXTRA=""
    CONF_FILE=/etc/pdm-edge/agent.toml
    CONF_EXAMPLE=$REPO_DIR/examples/agent.toml
    STATE_DIR=/var/lib/pdm-edge
    SERIAL_GROUP=dialout
    # credential name in the unit : file in /etc/credstore
    CREDENTIALS="central.token:pdm-edge.central.token status.token:pdm-edge.status.token mqtt.password:pdm-edge.mqtt.password"
    COMPANIONS=""
    ;;
central)
    NAME=pdm-central
    EXTRA=central
    CONF_FILE=/etc/pdm-central/central.env
    CONF_EXAMPLE=$SCRIPT_DIR/central.env.example
    STATE_DIR=""
    SERIAL_GROUP=""
    CREDENTIALS="ops_token:pdm-central.ops_token database_url:pdm-central.database_url"
    # Units the main one Wants= and that are PartOf= it: installed and removed with it, started and stopped by it.
    COMPANIONS="pdm-central-notify.service"
    ;;
esac
PREFIX=/opt/$NAME
CONF_DIR=/etc/$NAME
UNIT=$NAME.service
UNIT_DIR=/etc/systemd/system
DROPIN=$UNIT_DIR/$UNIT.d/10-backoff.conf
BACKUP_DIR=/var/backups/$NAME
CREDSTORE=/etc/credstore

# --- acting on / or on a folder --------------------------------------------------------------------------------

ROOT=$(realpath -m "$ROOT")
live() { [ "$ROOT" = / ]; }
# The path of an absolute system path under the root we act on.
p() { if live; then printf '%s' "$1"; else printf '%s%s' "$ROOT" "$1"; fi; }
# A command that changes the running system (users, ownership): run it on /, print it otherwise.
priv() { if live; then "$@"; else printf 'would run: %s\n' "$*"; fi; }
systemd_running() { live && [ -d /run/systemd/system ]; }
# systemctl verbs that need a running systemd (start, stop, daemon-reload...).
sdctl() {
    if systemd_running; then
        systemctl "$@"
    else
        printf 'would run: systemctl %s\n' "$*"
    fi
}

# --- checks ----------------------------------------------------------------------------------------------------

find_python() {
    local candidate found
    # The system's Python first: one under /root or /home (pyenv...) is hidden from the service (ProtectHome=yes).
    for candidate in ${PYTHON:-/usr/bin/python3 python3 python3.13 python3.12 python3.11}; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            found=$(command -v "$candidate")
            case "$(realpath "$found")" in
            /root/* | /home/*)
                if live; then
                    die "$found is under /root or /home, which the service cannot see (ProtectHome=yes): use --python with a system-wide Python"
                fi
                ;;
            esac
            printf '%s' "$found"
            return 0
        fi
    done
    die "$NAME needs Python >= 3.11 (found: $(python3 --version 2>&1 || echo none)); on Debian 12 and Ubuntu 24.04 it is python3; elsewhere use --python or the Docker image"
}

preflight() {
    if live && [ "$(id -u)" != 0 ]; then
        die "installing on this system needs root: run it with sudo (or use --root DIR to install into a folder)"
    fi
    if ! live; then
        mkdir -p "$ROOT"
    fi
}

# The source to install and its version: a checkout (pyproject.toml) or a wheel.
resolve_source() {
    if [ -z "$SOURCE" ]; then
        [ -f "$REPO_DIR/pyproject.toml" ] || die "no --from given and $REPO_DIR is not a checkout"
        SOURCE=$REPO_DIR
    fi
    [ -e "$SOURCE" ] || die "--from $SOURCE: no such file or folder"
    SOURCE=$(realpath "$SOURCE")
    if [ -d "$SOURCE" ]; then
        [ -f "$SOURCE/pyproject.toml" ] || die "--from $SOURCE: not a checkout (no pyproject.toml)"
        VERSION=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
            "$SOURCE/pyproject.toml")
    else
        case "$SOURCE" in
        *.whl) VERSION=$(basename "$SOURCE" | cut -d- -f2) ;;
        *) die "--from $SOURCE: neither a checkout nor a .whl file" ;;
        esac
    fi
    PIP_SPEC=$SOURCE
    [ -z "$EXTRA" ] || PIP_SPEC="${SOURCE}[${EXTRA}]"
}

installed() { [ -L "$(p "$PREFIX/venv")" ]; }
release_of() { readlink "$(p "$PREFIX/$1")"; }                 # venv | venv.prev -> releases/<name>
version_of() { basename "$1" | sed 's/-[0-9]\{8\}T[0-9]\{6\}Z.*$//'; } # releases/0.1.0-20261126T...Z -> 0.1.0

# --- the user, folders, units ----------------------------------------------------------------------------------

ensure_user() {
    if live && getent passwd "$NAME" >/dev/null; then
        :
    else
        if ! live || ! getent group "$NAME" >/dev/null; then priv groupadd --system "$NAME"; fi
        priv useradd --system --gid "$NAME" --home-dir "${STATE_DIR:-/nonexistent}" --no-create-home \
            --shell /usr/sbin/nologin --comment "$NAME service" "$NAME"
    fi
    # Serial ports for Modbus RTU: the unit adds the group itself (SupplementaryGroups=); the membership is for
    # `sudo -u pdm-edge pdm-edge modbus probe ...` from a shell.
    if [ -n "$SERIAL_GROUP" ]; then
        if ! live || ! id -nG "$NAME" | tr ' ' '\n' | grep -qx "$SERIAL_GROUP"; then
            priv usermod --append --groups "$SERIAL_GROUP" "$NAME"
        fi
    fi
}

# A folder with its mode and owner (the owner on / only).
folder() { # path mode owner
    mkdir -p "$(p "$1")"
    chmod "$2" "$(p "$1")"
    priv chown "$3" "$(p "$1")"
}

ensure_folders() {
    mkdir -p "$(p "$PREFIX/releases")" "$(p "$UNIT_DIR")"
    folder "$CONF_DIR" 0750 "root:$NAME"
    [ -z "$STATE_DIR" ] || folder "$STATE_DIR" 0750 "$NAME:$NAME"
    if [ ! -d "$(p "$CREDSTORE")" ]; then
        folder "$CREDSTORE" 0700 root:root
    fi
}

systemd_version() {
    if [ -n "${PDM_SYSTEMD_VERSION:-}" ]; then
        echo "$PDM_SYSTEMD_VERSION"
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --version | awk 'NR == 1 { print $2 + 0 }'
    else
        echo 0
    fi
}

# Copy a file if its content or mode differs; true if it changed.
put() { # source dest mode
    local dest
    dest=$(p "$2")
    if [ -f "$dest" ] && cmp -s "$1" "$dest" && [ "$(stat -c %a "$dest")" = "${3#0}" ]; then
        return 1
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$3" "$1" "$dest"
}

install_units() {
    local changed=0 companion
    put "$SCRIPT_DIR/$UNIT" "$UNIT_DIR/$UNIT" 0644 && changed=1
    for companion in $COMPANIONS; do
        put "$SCRIPT_DIR/$companion" "$UNIT_DIR/$companion" 0644 && changed=1
    done
    if [ "$(systemd_version)" -ge 254 ]; then
        put "$SCRIPT_DIR/backoff.conf" "$DROPIN" 0644 && changed=1
    elif [ -f "$(p "$DROPIN")" ]; then
        rm -f "$(p "$DROPIN")"
        changed=1
    fi
    for doc in DEPLOYMENT.md PRODUCTION_CHECKLIST.md; do
        if [ -f "$REPO_DIR/$doc" ]; then put "$REPO_DIR/$doc" "$PREFIX/doc/$doc" 0644 || true; fi
    done
    if [ "$changed" = 1 ]; then sdctl daemon-reload; fi
}

enable_unit() {
    if live; then
        systemctl enable --quiet "$UNIT"
    elif [ ! -L "$(p "$UNIT_DIR/multi-user.target.wants/$UNIT")" ]; then
        if command -v systemctl >/dev/null 2>&1; then
            systemctl --root="$ROOT" enable --quiet "$UNIT"
        else
            mkdir -p "$(p "$UNIT_DIR/multi-user.target.wants")"
            ln -s "$UNIT_DIR/$UNIT" "$(p "$UNIT_DIR/multi-user.target.wants/$UNIT")"
        fi
    fi
}

disable_unit() {
    if live; then
        if [ -f "$UNIT_DIR/$UNIT" ]; then systemctl disable --quiet --now "$UNIT" || true; fi
    elif [ -L "$(p "$UNIT_DIR/multi-user.target.wants/$UNIT")" ]; then
        if command -v systemctl >/dev/null 2>&1; then
            systemctl --root="$ROOT" disable --quiet "$UNIT"
        else
            rm -f "$(p "$UNIT_DIR/multi-user.target.wants/$UNIT")"
        fi
    fi
}

# --- releases ----------------------------------------------------------------------------------------------------

# A new virtual environment under releases/ with the source installed and checked; prints its name.
build_release() {
    local name dir
    local n=1
    name=releases/$VERSION-$STAMP
    while [ -e "$(p "$PREFIX/$name")" ]; do # two runs within a second
        n=$((n + 1))
        name=releases/$VERSION-$STAMP-$n
    done
    dir=$(p "$PREFIX/$name")
    say "building $NAME $VERSION in $dir"
    if ! "$PY" -m venv "$dir" 2>/dev/null; then
        rm -rf "$dir"
        if live && command -v apt-get >/dev/null 2>&1; then
            say "installing python3-venv (Debian/Ubuntu)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$PY" -m venv "$dir"
        else
            die "$PY -m venv failed: install python3-venv"
        fi
    fi
    # shellcheck disable=SC2086  # PDM_PIP_ARGS is a list of arguments
    if ! "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-input ${PDM_PIP_ARGS:-} \
        "$PIP_SPEC" >&2; then
        rm -rf "$dir"
        die "pip could not install $PIP_SPEC"
    fi
    if [ "$COMPONENT" = agent ] && ! PYTHONDONTWRITEBYTECODE=1 "$dir/bin/pdm-edge" model verify >&2; then
        rm -rf "$dir"
        die "the shipped model does not verify in the new release"
    fi
    printf '%s' "$name"
}

# Point a symlink (venv, venv.prev) at a release, atomically.
point() { # link release
    local link
    link=$(p "$PREFIX/$1")
    ln -sfn "$2" "$link.new"
    mv -T "$link.new" "$link"
}

prune_releases() {
    local keep_current keep_prev dir
    keep_current=$(release_of venv)
    keep_prev=$(release_of venv.prev 2>/dev/null || true)
    for dir in "$(p "$PREFIX/releases")"/*; do
        [ -d "$dir" ] || continue
        case "releases/$(basename "$dir")" in
        "$keep_current" | "$keep_prev") ;;
        *) rm -rf "$dir" ;;
        esac
    done
}

# /usr/local/bin/pdm-edge (pdm-central) for the operator's shell, unless something else is there already.
link_command() {
    local link
    link=$(p "/usr/local/bin/$NAME")
    if [ -L "$link" ] || [ ! -e "$link" ]; then
        mkdir -p "$(dirname "$link")"
        [ "$(readlink "$link" 2>/dev/null)" = "$PREFIX/venv/bin/$NAME" ] || ln -sfn "$PREFIX/venv/bin/$NAME" "$link"
    else
        say "left $link alone (not a symlink); the command is $PREFIX/venv/bin/$NAME"
    fi
}

unlink_command() {
    local link
    link=$(p "/usr/local/bin/$NAME")
    if [ "$(readlink "$link" 2>/dev/null)" = "$PREFIX/venv/bin/$NAME" ]; then rm -f "$link"; fi
}

# --- configuration -------------------------------------------------------------------------------------------------

default_gateway_id() {
    local id
    id=$(hostname -s 2>/dev/null || uname -n)
    id=$(printf '%s' "$id" | tr -c 'A-Za-z0-9._-' '-' | cut -c1-64)
    printf '%s' "${id:-gateway}"
}

# The configuration install.sh makes from the example (the same text every time, so an unedited one is recognised).
example_config() {
    if [ "$COMPONENT" = agent ]; then
        printf '# Made by systemd/install.sh from examples/agent.toml: edit it for this gateway, check it with\n'
        printf '#   pdm-edge check-config --config /etc/pdm-edge/agent.toml\n'
        printf '# then start the agent: systemctl start pdm-edge\n\n'
        sed "s/^gateway_id = \"[^\"]*\"/gateway_id = \"${GATEWAY_ID:-$(default_gateway_id)}\"/" "$CONF_EXAMPLE"
    else
        cat "$CONF_EXAMPLE"
    fi
}

# Install the configuration if there is none: --config FILE, else the example. Never overwrites.
ensure_config() {
    local dest tmp
    dest=$(p "$CONF_FILE")
    if [ -e "$dest" ]; then
        [ -z "$CONFIG_FROM" ] || say "kept the existing $CONF_FILE (--config $CONFIG_FROM not used)"
        return 0
    fi
    temporary tmp
    if [ -n "$CONFIG_FROM" ]; then
        cp "$CONFIG_FROM" "$tmp"
    else
        example_config >"$tmp"
    fi
    install -m 0640 "$tmp" "$dest"
    rm -f "$tmp"
    priv chown "root:$NAME" "$dest"
    say "wrote $CONF_FILE from ${CONFIG_FROM:-the example}"
}

config_is_unedited_example() {
    [ -z "$CONFIG_FROM" ] || return 1
    [ "$COMPONENT" = agent ] || return 1
    example_config | cmp -s - "$(p "$CONF_FILE")"
}

# Run a command as the service would: its user, working directory, environment file and credentials.
as_service() {
    local creds pair rc=0
    temporary creds -d
    for pair in $CREDENTIALS; do
        if [ -f "$(p "$CREDSTORE/${pair#*:}")" ]; then
            install -m 0400 "$(p "$CREDSTORE/${pair#*:}")" "$creds/${pair%%:*}"
        fi
    done
    if live; then chown -R "$NAME:$NAME" "$creds"; fi
    (
        if [ "$COMPONENT" = agent ]; then cd "$(p "$CONF_DIR")"; else cd "$(p "$PREFIX")"; fi
        export CREDENTIALS_DIRECTORY=$creds PYTHONDONTWRITEBYTECODE=1
        local run=()
        if [ "$COMPONENT" = central ]; then
            # As the unit: Environment=PDM_CENTRAL_MODE=production, then EnvironmentFile= read as systemd reads it
            # (never sourced: a shell would expand $ and run $(...) in it, as root).
            export PDM_CENTRAL_MODE=production
            run=("$PY" "$SCRIPT_DIR/envfile.py" "$(p "$CONF_FILE")" --)
        fi
        if live; then run+=(runuser -u "$NAME" --); fi
        exec "${run[@]}" "$@"
    ) || rc=$?
    rm -rf "$creds"
    return "$rc"
}

# Is the configuration good enough to start? Prints the problems.
check_config() { # release
    local bin
    bin=$(p "$PREFIX/$1/bin")
    if [ "$COMPONENT" = agent ]; then
        as_service "$bin/pdm-edge" check-config --config "$(p "$CONF_FILE")" >/dev/null
    else
        as_service "$bin/python" -c '
import sys
from central.settings import SettingsError, load_settings
try:
    problems = load_settings().serving_problems()
except SettingsError as exc:
    problems = exc.problems
for problem in problems:
    print(f"  {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)'
    fi
}

migrate() { # release
    [ "$COMPONENT" = central ] || return 0 # the agent migrates its buffer in place when it opens it
    say "migrating the database schema"
    as_service "$(p "$PREFIX/$1/bin/pdm-central")" migrate
}

# --- the agent's buffer ----------------------------------------------------------------------------------------

DB=${STATE_DIR:+$STATE_DIR/agent.db}

db_schema() { # file -> PRAGMA user_version
    "$PY" -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA user_version").fetchone()[0])' "$1"
}

# A consistent copy of the buffer (WAL included) into the backup folder; prints its path.
backup_db() { # label
    local src dest
    src=$(p "$DB")
    dest=$(p "$BACKUP_DIR/agent-$1-$STAMP.db")
    mkdir -p "$(dirname "$dest")"
    chmod 0700 "$(dirname "$dest")"
    "$PY" - "$src" "$dest" <<'PY'
import sqlite3, sys
source, target = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
source.backup(target)
ok = target.execute("PRAGMA integrity_check").fetchone()[0]
target.close()
source.close()
sys.exit(0 if ok == "ok" else f"{sys.argv[2]}: integrity_check says {ok}")
PY
    chmod 0600 "$dest"
    # keep the five newest
    find "$(dirname "$dest")" -maxdepth 1 -name 'agent-*.db' -printf '%T@ %p\n' | sort -rn | tail -n +6 | cut -d' ' -f2- |
        xargs -r rm -f
    printf '%s' "$dest"
}

restore_db() { # backup file
    local dest
    dest=$(p "$DB")
    rm -f "$dest-wal" "$dest-shm"
    install -m 0600 "$1" "$dest"
    priv chown "$NAME:$NAME" "$dest"
}

# --- the service -----------------------------------------------------------------------------------------------

start_and_settle() {
    sdctl start "$UNIT" || return 1
    systemd_running || return 0
    local restarts
    restarts=$(systemctl show -P NRestarts "$UNIT")
    sleep "$SETTLE_S"
    systemctl is-active --quiet "$UNIT" && [ "$(systemctl show -P NRestarts "$UNIT")" = "$restarts" ]
}

# --- actions -----------------------------------------------------------------------------------------------------

do_install() {
    local release fresh=0
    resolve_source
    ensure_user
    ensure_folders
    if installed; then
        say "$NAME $(version_of "$(release_of venv)") is installed already in $PREFIX (--upgrade replaces it)"
        release=$(release_of venv)
    else
        release=$(build_release)
        point venv "$release"
        fresh=1
    fi
    link_command
    install_units
    ensure_config
    enable_unit
    if [ "$START" = 0 ]; then
        say "installed and enabled; not started (--no-start)"
        return 0
    fi
    if config_is_unedited_example; then
        say "installed and enabled, NOT started: $CONF_FILE is the unedited example (its devices are not this plant's)."
        say "Edit it, check it (pdm-edge check-config), then: systemctl start $UNIT"
        return 3
    fi
    if ! check_config "$release"; then
        say "installed and enabled, NOT started: fix the configuration problems above, then: systemctl start $UNIT"
        return 3
    fi
    if [ "$fresh" = 1 ] || ! systemd_running || ! systemctl is-active --quiet "$UNIT"; then
        migrate "$release" || die "migration failed: $UNIT not started"
    fi
    sdctl start "$UNIT"
    if systemd_running; then
        say "$NAME $(version_of "$release") installed and started"
    else
        say "$NAME $(version_of "$release") installed and enabled, not started: no systemd runs in $ROOT (the start is the \"would run\" line above)"
    fi
}

do_upgrade() {
    local old old_prev new backup=""
    installed || die "$NAME is not installed in $(p "$PREFIX"): run without --upgrade"
    resolve_source
    ensure_user
    ensure_folders
    old=$(release_of venv)
    old_prev=$(release_of venv.prev 2>/dev/null || true)
    new=$(build_release)
    if ! check_config "$new"; then
        rm -rf "$(p "$PREFIX/$new")"
        die "the configuration does not pass the new release's check (above); nothing was changed"
    fi
    install_units
    sdctl stop "$UNIT"
    if [ -n "$DB" ] && [ -f "$(p "$DB")" ]; then
        backup=$(backup_db "$(version_of "$old")")
        say "buffer saved to $backup"
    fi
    point venv.prev "$old"
    point venv "$new"
    if ! migrate "$new" || ! start_and_settle; then
        say "$NAME $(version_of "$new") failed to start: rolling back to $(version_of "$old")"
        sdctl stop "$UNIT" || true
        point venv "$old"
        if [ -n "$old_prev" ]; then point venv.prev "$old_prev"; else rm -f "$(p "$PREFIX/venv.prev")"; fi
        restore_if_newer "$old" "$backup"
        rm -rf "$(p "$PREFIX/$new")"
        sdctl start "$UNIT" || true
        die "upgrade failed; $(version_of "$old") is running again (journalctl -u $UNIT tells why)"
    fi
    prune_releases
    say "$NAME upgraded: $(version_of "$old") -> $(version_of "$new") (--rollback goes back)"
}

# The buffer's schema is newer than `release` can open: put the backup back (readings since are lost, see
# DEPLOYMENT.md). Older or equal: keep it, the older agent opens it.
restore_if_newer() { # release backup
    [ -n "$DB" ] && [ -f "$(p "$DB")" ] || return 0
    local supported current
    supported=$("$(p "$PREFIX/$1/bin/python")" -c 'from agent.store import SCHEMA_VERSION; print(SCHEMA_VERSION)')
    current=$(db_schema "$(p "$DB")")
    [ "$current" -gt "$supported" ] || return 0
    [ -n "$2" ] && [ -f "$2" ] || die "the buffer's schema ($current) is newer than $1 opens ($supported) and there is no backup"
    say "the buffer's schema ($current) is newer than $(version_of "$1") opens ($supported): restoring $2"
    backup_db "schema$current-replaced" >/dev/null
    restore_db "$2"
}

do_rollback() {
    local current previous backup
    installed || die "$NAME is not installed"
    [ -L "$(p "$PREFIX/venv.prev")" ] || die "no release to roll back to (venv.prev): nothing was upgraded"
    PY=$(find_python)
    current=$(release_of venv)
    previous=$(release_of venv.prev)
    [ -d "$(p "$PREFIX/$previous")" ] || die "$previous is gone"
    sdctl stop "$UNIT"
    # no backup folder (central has none): no backup; without `|| true` pipefail would end the script here silently,
    # the service stopped (found by tests/deploy/test_systemd_central.py)
    backup=$(find "$(p "$BACKUP_DIR")" -maxdepth 1 -name "agent-$(version_of "$previous")-*.db" -printf '%T@ %p\n' \
        2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2- || true)
    restore_if_newer "$previous" "$backup"
    point venv "$previous"
    point venv.prev "$current"
    sdctl start "$UNIT"
    say "$NAME rolled back: $(version_of "$current") -> $(version_of "$previous") (--rollback again goes forward)"
}

do_uninstall() {
    local pair companion
    disable_unit
    rm -f "$(p "$UNIT_DIR/$UNIT")" "$(p "$DROPIN")"
    for companion in $COMPANIONS; do rm -f "$(p "$UNIT_DIR/$companion")"; done
    rmdir "$(p "$UNIT_DIR/$UNIT.d")" 2>/dev/null || true
    sdctl daemon-reload
    rm -rf "$(p "$PREFIX")"
    unlink_command
    if [ "$PURGE" = 1 ]; then
        rm -rf "$(p "$CONF_DIR")" "$(p "$BACKUP_DIR")" "$(p "$UNIT_DIR/$UNIT.d")"
        [ -z "$STATE_DIR" ] || rm -rf "$(p "$STATE_DIR")"
        for pair in $CREDENTIALS; do rm -f "$(p "$CREDSTORE/${pair#*:}")"; done
        if ! live || getent passwd "$NAME" >/dev/null; then priv userdel "$NAME"; fi
        if ! live || getent group "$NAME" >/dev/null; then priv groupdel "$NAME"; fi
        say "$NAME removed with its configuration, data, backups, secrets and user"
    else
        say "$NAME removed; kept: $CONF_DIR, ${STATE_DIR:+$STATE_DIR, }$BACKUP_DIR, $CREDSTORE/$NAME.*, user $NAME (--purge removes them)"
    fi
}

preflight
case "$ACTION" in
install) PY=$(find_python) && do_install ;;
upgrade) PY=$(find_python) && do_upgrade ;;
rollback) do_rollback ;;
uninstall) do_uninstall ;;
esac
