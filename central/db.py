"""PostgreSQL: connections, the pool of the API, and the schema migrations.

Errors (who raises what):
    DatabaseUnavailable  the server cannot be reached, refused us, timed out or shut down: retry later (HTTP 503)
    SchemaMismatch       the schema is not the version this code needs: run `pdm-central migrate` (HTTP 503)
    MigrationError       a migration cannot be applied (changed after it was applied, or a newer database)
psycopg's own errors are mapped at this boundary by `unavailable()`; anything else is a bug.

Migrations are `migrations/NNNN_name.sql`, numbered from 0001, each number once. A gap is allowed (0006 was
written beside another branch's 0005): a migration missing from the run is applied when it arrives, after the higher
ones already applied, so migrations written in parallel must not depend on each other. `migrate()` applies the pending ones in
one transaction under an advisory lock (two concurrent runs apply each migration once), records each with the
sha256 of its file in `schema_migrations`, and refuses to go on when an applied file has changed since.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.abc import Params
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout
from starlette.requests import Request

from central.settings import Settings
from web.logs import first_line

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = 0x7064_6D63  # pg_advisory_xact_lock key: "pdmc"
APPLICATION_NAME = "pdm-central"
# How a route opens a pooled connection for its request (central/app.py's `connection`).
Connection = Callable[[Request], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot serve us right now; the message says why, without the URL's password."""


class SchemaMismatch(RuntimeError):
    """The database's schema is not the version this code was written for."""


class MigrationError(RuntimeError):
    """A migration cannot be applied."""


UNAVAILABLE = (psycopg.OperationalError, PoolTimeout, PoolClosed)


def unavailable(exc: Exception) -> DatabaseUnavailable:
    """Map a connection-level failure to DatabaseUnavailable (statement timeouts and shutdowns included)."""
    if isinstance(exc, PoolTimeout):
        return DatabaseUnavailable("no database connection could be had in time (is PostgreSQL running?)")
    text = first_line(exc)
    return DatabaseUnavailable(f"database unavailable: {text}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    for before, migration in pairwise(found):
        if migration.version == before.version:
            raise MigrationError(f"two migrations are numbered {migration.version:04d}: "
                                 f"{before.name} and {migration.name}; renumber one")
    if found and found[0].version != 1:
        raise MigrationError(f"migration 0001 is missing (found {found[0].version:04d}_{found[0].name})")
    return tuple(found)


def latest_version() -> int:
    return migrations()[-1].version


SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
# Two statements: a query naming a missing table fails to plan, even in a branch that would not run.
HAS_MIGRATIONS = "SELECT to_regclass('schema_migrations') IS NOT NULL"
MAX_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"


def conninfo_kwargs(settings: Settings, url: str | None = None) -> tuple[str, dict[str, Any]]:
    """The URL (default: the primary's) and the connection parameters we add, without overriding what it says."""
    url = url or settings.database_url.get_secret_value()
    given = pg_conninfo.conninfo_to_dict(url)
    extra: dict[str, Any] = {"application_name": APPLICATION_NAME}
    if "connect_timeout" not in given:
        extra["connect_timeout"] = max(2, math.ceil(settings.db_timeout_s))  # libpq's minimum is 2 s
    return url, extra


def connect(settings: Settings) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain connection for the CLI, in autocommit mode (transactions are explicit); DatabaseUnavailable when
    PostgreSQL cannot be reached."""
    url, extra = conninfo_kwargs(settings)
    try:
        return psycopg.connect(url, autocommit=True, **extra)
    except psycopg.OperationalError as exc:
        raise unavailable(exc) from exc


def one_row_sync(conn: psycopg.Connection[tuple[Any, ...]], query: str,
                 params: Params | None = None) -> tuple[Any, ...]:
    """The row of a statement that always returns one (an aggregate, an upsert's RETURNING)."""
    return conn.execute(query, params).fetchone() or no_row(query)


async def one_row(conn: psycopg.AsyncConnection[tuple[Any, ...]], query: str,
                  params: Params | None = None) -> tuple[Any, ...]:
    """The row of a statement that always returns one (an aggregate, an upsert's RETURNING)."""
    return await (await conn.execute(query, params)).fetchone() or no_row(query)


def no_row(query: object) -> NoReturn:
    raise RuntimeError(f"no row from a statement that always returns one: {str(query)[:80]!r}")


def schema_version(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """The latest migration applied; 0 for an empty database."""
    if not one_row_sync(conn, HAS_MIGRATIONS)[0]:
        return 0
    return int(one_row_sync(conn, MAX_VERSION)[0])


async def schema_version_async(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> int:
    if not (await one_row(conn, HAS_MIGRATIONS))[0]:
        return 0
    return int((await one_row(conn, MAX_VERSION))[0])


def migrate(conn: psycopg.Connection) -> list[Migration]:
    """Apply the pending migrations; return them (empty when the schema was up to date)."""
    applied: list[Migration] = []
    row = conn.execute("SELECT current_database(), pg_encoding_to_char(encoding) FROM pg_database "
                       "WHERE datname = current_database()").fetchone()
    if row is not None and row[1] != "UTF8":
        # a cluster made under the C locale gives SQL_ASCII: names with accents would be stored as raw bytes
        raise MigrationError(f"the database {row[0]} has the encoding {row[1]}, pdm-central needs UTF8: create it "
                             f"with createdb --encoding UTF8 --template template0 --owner ... {row[0]}")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
        conn.execute(SCHEMA_MIGRATIONS)
        done: dict[int, str] = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        known = {m.version: m for m in migrations()}
        newer = sorted(set(done) - set(known))
        if newer:
            raise MigrationError(f"the database is at schema version {max(done)}, newer than this pdm-central "
                                 f"({latest_version()}): upgrade pdm-central")
        for migration in migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name}.sql changed after it was applied; "
                        "restore the file (a change to the schema is a new migration)")
                continue
            conn.execute(migration.sql)
            conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                         [migration.version, migration.name, migration.checksum])
            applied.append(migration)
    return applied


async def _configure(conn: psycopg.AsyncConnection, statement_timeout_ms: int) -> None:
    await conn.set_autocommit(True)
    await conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('TimeZone', 'UTC', false)",
                       [f"{statement_timeout_ms}ms"])


def make_pool(settings: Settings, url: str | None = None, name: str = APPLICATION_NAME) -> AsyncConnectionPool:
    """The API's pool, not yet open: `await pool.open(wait=False)` starts it even while PostgreSQL is down.

    Connections are in autocommit mode (a transaction is always explicit), checked before each use (a server
    restart costs failed checks, not a failed request: the first one sweeps the pool), and in UTC (JSON built by
    PostgreSQL says +00:00).
    A request waits at most `db_timeout_s` for a connection, then fails with PoolTimeout: HTTP 503.
    """
    url, extra = conninfo_kwargs(settings, url)
    timeout_ms = int(settings.statement_timeout_s * 1000)

    async def configure(conn: psycopg.AsyncConnection) -> None:
        await _configure(conn, timeout_ms)

    sweeps: set[asyncio.Task[None]] = set()

    async def check(conn: psycopg.AsyncConnection) -> None:
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            # One dead connection means the server restarted: every idle one beside it is dead too. The pool would
            # find them one request at a time, waiting 1, 2, 4 s between failed checks (a request's whole
            # db_timeout_s after a restart); a sweep replaces them all at once.
            if not sweeps:
                sweep = asyncio.get_running_loop().create_task(pool.check())
                sweeps.add(sweep)
                sweep.add_done_callback(sweeps.discard)
            raise

    pool = AsyncConnectionPool(
        url,
        kwargs=extra,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.db_timeout_s,
        # Give up a reconnection attempt quickly: the next request starts a new one at once, whereas the attempt's
        # own backoff would reach minutes during a long outage and delay the recovery as much.
        reconnect_timeout=max(10.0, 2 * settings.db_timeout_s),
        configure=configure,
        check=check,
        name=name,
        open=False,
    )
    return pool
