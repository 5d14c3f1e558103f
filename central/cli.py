"""`pdm-central`: the central API's command line. Settings come from PDM_CENTRAL_ variables (central/settings.py).

Everything printed goes through `say`: control characters (from a gateway's agent_version stored before the
protocol refused them, a database error, an argument) are shown escaped, never sent to the terminal raw.

Exit codes: 0 done; 1 the operation failed (database unreachable, unknown gateway, migration refused); 2 unusable
settings or usage, or the central extra is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from central import __version__
from central.fleet import cli as fleet_cli
from central.settings import Settings, SettingsError, load_settings
from sync.protocol import escape_controls
from web.extras import missing_extra


def say(text: str, file: TextIO | None = None) -> None:
    """print(), with control characters escaped (terminal escape injection, issue 22)."""
    print("\n".join(escape_controls(line) for line in str(text).split("\n")), file=file or sys.stdout)


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from central import db

    with db.connect(settings) as conn:
        applied = db.migrate(conn)
        version = db.schema_version(conn)
    for migration in applied:
        say(f"applied {migration.version:04d}_{migration.name}", file=sys.stderr)
    say(f"schema at version {version}" + ("" if applied else " (already up to date)"), file=sys.stderr)
    return 0


def _add_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from central import auth, db

    with db.connect(settings) as conn:
        token = auth.add_gateway(conn, args.name)
    # The token alone on stdout, so that TOKEN=$(pdm-central add-gateway NAME) works; it is not stored anywhere.
    say(token)
    say(f"gateway {args.name!r} is active. Its token was printed once and cannot be shown again: put it in the "
          "gateway's central.token (e.g. the systemd credential central.token). Lost? revoke-gateway, then "
          "add-gateway again.", file=sys.stderr)
    return 0


def _revoke_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from central import auth, db

    with db.connect(settings) as conn:
        when = auth.revoke_gateway(conn, args.name)
    say(f"gateway {args.name!r} revoked at {when.isoformat()}: its token is refused from now on", file=sys.stderr)
    return 0


def _list_gateways(settings: Settings, args: argparse.Namespace) -> int:
    from central import auth, db

    with db.connect(settings) as conn:
        rows = auth.list_gateways(conn)
    keys = ("name", "created_at", "revoked_at", "last_seen_at", "agent_version")
    if args.json:
        say(json.dumps([dict(zip(keys, row, strict=True)) for row in rows], default=str, indent=2))
        return 0
    say(f"{'name':<24}{'state':<9}{'last seen':<27}agent")
    for name, _, revoked_at, last_seen_at, agent_version in rows:
        seen = last_seen_at.isoformat(timespec="seconds") if last_seen_at else "never"
        say(f"{name:<24}{'revoked' if revoked_at else 'active':<9}{seen:<27}{agent_version or ''}")
    return 0


def _maintain(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from central import partitions

    report = asyncio.run(partitions.maintain_once(settings))
    if report is None:
        say("another pdm-central process is running a maintenance round; nothing done", file=sys.stderr)
        return 0
    say(str(report), file=sys.stderr)
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from central import server
    from web import logs

    logs.setup(settings.log_level, settings.log_format)
    server.serve(settings, args.host, args.port)
    return 0


def _notify(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from central.notify import process
    from web import logs

    logs.setup(settings.log_level, settings.log_format)
    asyncio.run(process.run(settings))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pdm-central", description=__doc__.split("\n")[0])
    root.add_argument("--version", action="version", version=f"pdm-central {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create or upgrade the database schema (safe to run again)") \
        .set_defaults(handler=_migrate)
    add = commands.add_parser("add-gateway", help="register a gateway; print its new token (shown once)")
    add.add_argument("name", help="the gateway's gateway_id: 1-64 characters of A-Z a-z 0-9 . _ -")
    add.set_defaults(handler=_add_gateway)
    revoke = commands.add_parser("revoke-gateway", help="refuse a gateway's token from now on (its data stays)")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke_gateway)
    listing = commands.add_parser("list-gateways", help="the gateways, active or revoked, and when each was last seen")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list_gateways)
    commands.add_parser("maintain", help="create the coming days' partitions and drop those past retention (the API "
                        "does it hourly unless PDM_CENTRAL_MAINTENANCE_INTERVAL_S=0)").set_defaults(handler=_maintain)
    fleet_cli.register(commands)
    serve = commands.add_parser("serve", help="serve the API with uvicorn in one process (development; production: "
                                "gunicorn -c python:central.gunicorn_conf)")
    serve.add_argument("--host", help="default: the host of PDM_CENTRAL_BIND (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default: the port of PDM_CENTRAL_BIND (8000)")
    serve.set_defaults(handler=_serve)
    commands.add_parser("notify", help="deliver the notifications in a process of its own, until SIGTERM (production: "
                        "with PDM_CENTRAL_NOTIFY_WORKER=off for the API)").set_defaults(handler=_notify)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    done = fleet_cli.run_without_settings(args)
    if done is not None:
        return done
    try:
        return _dispatch(args)
    except ModuleNotFoundError as exc:
        return missing_extra(f"pdm-central {args.command}", exc)


def _dispatch(args: argparse.Namespace) -> int:
    import psycopg  # the central extra, not needed for --help

    from central import auth, db

    try:
        settings = load_settings()
        code: int = args.handler(settings, args)
        return code
    except SettingsError as exc:
        say(f"pdm-central: {len(exc.problems)} settings problem(s):", file=sys.stderr)
        for problem in exc.problems:
            say(f"  {problem}", file=sys.stderr)
        return 2
    except (db.DatabaseUnavailable, db.MigrationError, db.SchemaMismatch, auth.GatewayError,
            fleet_cli.FleetError) as exc:
        say(f"pdm-central: {exc}", file=sys.stderr)
        return 1
    except db.UNAVAILABLE as exc:
        say(f"pdm-central: {db.unavailable(exc)}", file=sys.stderr)
        return 1
    except psycopg.errors.UndefinedTable:
        say("pdm-central: the database has no schema yet: run `pdm-central migrate`", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
