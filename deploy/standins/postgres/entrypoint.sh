#!/bin/bash
# The stand-in's start: on an empty $PGDATA, initdb with POSTGRES_USER as the superuser, the password from
# POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD), scram-sha-256 over TCP, trust on the local socket, and
# POSTGRES_DB created; then the server as user postgres, listening on every address. As the official image does.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then
    install -d -o postgres -g postgres -m 0700 "$PGDATA"
    install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
        user=${POSTGRES_USER:-postgres}
        pwfile=$(mktemp)
        if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then cat "$POSTGRES_PASSWORD_FILE" >"$pwfile"; else
            printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE}" >"$pwfile"; fi
        chown postgres "$pwfile"
        setpriv --reuid=postgres --regid=postgres --init-groups initdb --username="$user" --pwfile="$pwfile" \
            --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
        rm -f "$pwfile"
        printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
        db=${POSTGRES_DB:-$user}
        if [ "$db" != postgres ]; then
            echo "CREATE DATABASE \"$db\" OWNER \"$user\"" |
                setpriv --reuid=postgres --regid=postgres --init-groups postgres --single -D "$PGDATA" postgres >/dev/null
        fi
        echo "stand-in postgres: initialised $PGDATA (user $user, database $db)"
    fi
    if [ "${1:-}" = postgres ]; then
        exec setpriv --reuid=postgres --regid=postgres --init-groups "$@" -c listen_addresses='*'
    fi
fi
exec "$@"
