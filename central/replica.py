"""Reads from a PostgreSQL streaming replica (PDM_CENTRAL_READ_DATABASE_URL, optional), writes on the primary.

Who reads where:
  replica (when configured and up)  the dashboard's data (fleet, machine charts) and the ops API's reads (fleet,
                                    machines, summaries, events)
  primary, always                   ingest, the desired state, dashboard sessions (sign-in, each request's session
                                    check), alarm episodes and their actions (read-your-writes after an acknowledge)

A replica that cannot be reached is not an outage: `Reads.connection()` falls back to the primary, logs a warning
when that starts and an info line when the replica is back (not once per request), counts the fallbacks, and tries
the replica again after RETRY_S. A query that fails on the replica for a connection reason marks it down the same
way (that request answers 503 as any database failure; the next ones read from the primary).

The lag shown on the dashboard is the replica's own view: 0 when it has replayed all the WAL it received, else the
time since the last transaction it replayed (a primary with no writes makes no lag).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from fastapi import Request
from psycopg_pool import AsyncConnectionPool

from central import db
from central.settings import Settings

log = logging.getLogger("central.replica")

RETRY_S = 10.0
CONNECT_WAIT_S = 1.0  # how long a read waits for a replica connection before reading from the primary
LAG = """
SELECT pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0.0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::double precision END
"""


@dataclass(frozen=True)
class Source:
    """Where a read went: `replica` True when it was served by the replica."""

    replica: bool


# A connection for the dashboard's and ops' reads (a replica when configured), and where it came from.
ReadConnection = Callable[[Request], AbstractAsyncContextManager[tuple[psycopg.AsyncConnection[Any], Source]]]


class Reads:
    """The replica's pool (or none) and the fallback to the primary's."""

    def __init__(self, settings: Settings) -> None:
        url = settings.read_database_url
        self.configured = url is not None
        self.pool: AsyncConnectionPool[Any] | None = None
        if url is not None:
            self.pool = db.make_pool(settings, url=url.get_secret_value(),
                                     name=db.APPLICATION_NAME + "-reads")
        self.fallbacks = 0
        self._down_until = 0.0
        self._down_reason: str | None = None

    async def open(self) -> None:
        if self.pool is not None:
            await self.pool.open(wait=False)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    @property
    def down(self) -> bool:
        return self._down_reason is not None

    def _mark_down(self, exc: Exception) -> None:
        reason = str(db.unavailable(exc))
        self._down_until = time.monotonic() + RETRY_S
        if self._down_reason is None:
            log.warning("read replica unavailable (%s): reading from the primary, trying the replica again every "
                        "%g s", reason, RETRY_S)
        self._down_reason = reason

    def _mark_up(self) -> None:
        if self._down_reason is not None:
            log.info("read replica back: the dashboard and ops reads go to it again")
        self._down_reason = None

    @asynccontextmanager
    async def connection(self, primary: AsyncConnectionPool[Any],
                         timeout: float | None = None) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], Source]]:
        """A connection for reads and where it goes; DatabaseUnavailable when neither server can serve."""
        if self.pool is not None and time.monotonic() >= self._down_until:
            served = False
            try:
                async with self.pool.connection(CONNECT_WAIT_S) as conn:
                    self._mark_up()
                    served = True
                    yield conn, Source(replica=True)
                return
            except db.UNAVAILABLE as exc:
                self._mark_down(exc)
                if served:  # failed during the request's queries: this request fails, the next go to the primary
                    raise db.unavailable(exc) from exc
        if self.configured:
            self.fallbacks += 1
        try:
            async with primary.connection(timeout) as conn:
                yield conn, Source(replica=False)
        except db.UNAVAILABLE as exc:
            raise db.unavailable(exc) from exc

    async def status(self, conn: psycopg.AsyncConnection[Any], source: Source) -> dict[str, Any]:
        """For the dashboard: where its data came from and, from a replica, its lag in seconds."""
        if not self.configured:
            return {"from": "primary", "replica": None}
        if not source.replica:
            return {"from": "primary", "replica": {"state": "down", "error": self._down_reason,
                                                   "fallbacks": self.fallbacks}}
        in_recovery, lag = await db.one_row(conn, LAG)
        return {"from": "replica", "replica": {"state": "streaming" if in_recovery else "not_a_replica",
                                               "lag_s": lag, "fallbacks": self.fallbacks}}
