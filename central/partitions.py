"""Time partitions (migration 0006) and retention: summaries by UTC day, events and the hourly roll-up by UTC month.

Who calls what:
  ensure_ahead(conn, now, days)       a maintenance round: the partitions from now to `days` ahead
  apply_retention(conn, now, policy)  a maintenance round: partitions wholly past their table's retention are
                                      detached CONCURRENTLY, then dropped; closed alarm episodes past theirs are
                                      deleted in batches of EPISODE_BATCH (a small table, off the hot path)
  Partitions.ensure_for(conn, batch)  ingest, before its transaction: the partitions the batch needs that this process
                                      has not seen yet (a gateway back from an outage brings old days; normally all
                                      exist already and this costs nothing)
  Maintenance                         the lifespan's task: a round at start and every PDM_CENTRAL_MAINTENANCE_INTERVAL_S,
                                      one process at a time (a session advisory lock), never dying of a failed round
  `pdm-central maintain`              one round from the command line (a systemd timer when the task is off)

Our own code, not pg_partman: a user's fresh machine runs the tests on an embedded PostgreSQL without extensions, and
central needs three things only (create ahead with ATTACH, drop with DETACH CONCURRENTLY, one naming rule), which
pdm_ensure_partition() and this module do in about 200 lines; pg_partman would add a package to install, a
background worker or cron to configure and its own catalog to upgrade.

Locks: creating is CREATE TABLE + ATTACH PARTITION and dropping is DETACH PARTITION CONCURRENTLY + DROP TABLE of the
detached table, each SHARE UPDATE EXCLUSIVE on the parent at most: ingest (ROW EXCLUSIVE) and reads (ACCESS SHARE)
never wait for them. DETACH CONCURRENTLY runs outside a transaction (the connection is in autocommit mode); one left
half-done by a lost connection is finished (FINALIZE) by the next round. A bulk DELETE never runs on these tables.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from central import db
from central.settings import Settings
from central.supervised import Supervised
from sync.protocol import IngestBatch
from web.logs import first_line

log = logging.getLogger("central.partitions")

MAINTENANCE_LOCK = 0x7064_6D70  # pg_try_advisory_lock key: "pdmp"
EPISODE_BATCH = 1000
ENSURE_LOCK_TIMEOUT = "2s"  # ingest's on-demand creation waits no longer behind a detach: 503, the agent retries
PERIODS = {"summaries": "day", "events": "month", "summaries_hourly": "month"}


def utc_now() -> datetime:
    return datetime.now(UTC)


def period_start(moment: datetime, period: str) -> datetime:
    moment = moment.astimezone(UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc_day(moment: datetime) -> int:
    """The UTC day of an aware datetime, as days since 1970-01-01 (period_start's day, without its datetimes)."""
    return (moment - _EPOCH).days  # a timedelta's days are floored: exact, whatever the year


def period_end(start: datetime, period: str) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


@dataclass(frozen=True)
class Partition:
    parent: str
    name: str
    start: datetime
    end: datetime
    detach_pending: bool = False


@dataclass(frozen=True)
class Retention:
    """How long each table keeps its rows, in days (PDM_CENTRAL_RETAIN_*)."""

    summaries: int = 30
    rollup: int = 5 * 366
    events: int = 400
    episodes: int = 730

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        return cls(settings.retain_summaries_days, settings.retain_rollup_days, settings.retain_events_days,
                   settings.retain_episodes_days)

    def days(self, parent: str) -> int:
        return {"summaries": self.summaries, "summaries_hourly": self.rollup, "events": self.events}[parent]


@dataclass
class Report:
    """What a maintenance round did."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    episodes_deleted: int = 0

    def __str__(self) -> str:
        return (f"created {len(self.created)} partition(s){_names(self.created)}, dropped {len(self.dropped)}"
                f"{_names(self.dropped)}, deleted {self.episodes_deleted} closed alarm episode(s)")


def _names(names: list[str]) -> str:
    return f" ({', '.join(names)})" if names else ""


LIST = """
SELECT c.relname, i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %s::regclass ORDER BY c.relname
"""
NAME = re.compile(r"^(?P<parent>[a-z_]+)_p(?P<start>\d{8}|\d{6})$")


def parse(parent: str, name: str, detach_pending: bool = False) -> Partition | None:
    """The partition named by pdm_ensure_partition's rule; None for a table of another name (left alone)."""
    match = NAME.match(name)
    period = PERIODS[parent]
    if not match or match["parent"] != parent or len(match["start"]) != (8 if period == "day" else 6):
        return None
    text = match["start"]
    try:
        start = datetime(int(text[:4]), int(text[4:6]), int(text[6:8]) if period == "day" else 1, tzinfo=UTC)
    except ValueError:
        return None
    return Partition(parent, name, start, period_end(start, period), detach_pending)


async def partitions(conn: psycopg.AsyncConnection[Any], parent: str) -> list[Partition]:
    rows = await (await conn.execute(LIST, [parent])).fetchall()
    return [p for name, pending in rows if (p := parse(parent, name, pending)) is not None]


async def ensure(conn: psycopg.AsyncConnection[Any], parent: str, moment: datetime) -> str:
    """The partition of `parent` holding `moment`, created when missing; its name."""
    name: str = (await db.one_row(conn, "SELECT pdm_ensure_partition(%s, %s)", [parent, moment]))[0]
    return name


async def ensure_ahead(conn: psycopg.AsyncConnection[Any], now: datetime, days: int) -> list[str]:
    """Partitions for every day from today to `days` ahead (and the months they fall in); the names created."""
    before = {p.name for parent in PERIODS for p in await partitions(conn, parent)}
    wanted = [now + timedelta(days=d) for d in range(days + 1)]
    names = set()
    for moment in wanted:
        for parent in PERIODS:
            names.add(await ensure(conn, parent, moment))
    return sorted(names - before)


async def drop(conn: psycopg.AsyncConnection[Any], partition: Partition) -> None:
    """Detach the partition without blocking ingest or reads, then drop the detached table. `conn` in autocommit."""
    parent, name = sql.Identifier(partition.parent), sql.Identifier(partition.name)
    if partition.detach_pending:  # a previous round's detach was interrupted
        await conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, name))
    else:
        await conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, name))
    await conn.execute(sql.SQL("DROP TABLE {}").format(name))


# Closed episodes past retention, with the episodes merged into them, their audit log and their deliveries.
OLD_EPISODES = """
WITH RECURSIVE doomed AS (
    (SELECT id FROM alarm_episodes WHERE merged_into IS NULL AND closed_at < %(cutoff)s ORDER BY id LIMIT %(batch)s)
    UNION
    SELECT e.id FROM alarm_episodes e JOIN doomed d ON e.merged_into = d.id
)
SELECT coalesce(array_agg(id), '{}') FROM doomed
"""


async def delete_old_episodes(conn: psycopg.AsyncConnection[Any], cutoff: datetime) -> int:
    deleted = 0
    while True:
        async with conn.transaction():
            ids = (await db.one_row(conn, OLD_EPISODES, {"cutoff": cutoff, "batch": EPISODE_BATCH}))[0]
            if not ids:
                return deleted
            await conn.execute("DELETE FROM alarm_actions WHERE episode_id = ANY(%s)", [ids])
            await conn.execute("DELETE FROM notify_outbox WHERE episode_id = ANY(%s)", [ids])
            deleted += (await conn.execute("DELETE FROM alarm_episodes WHERE id = ANY(%s)", [ids])).rowcount


async def apply_retention(conn: psycopg.AsyncConnection[Any], now: datetime, retention: Retention,
                          report: Report | None = None) -> Report:
    """Drop every partition that ends before its table's retention began; delete closed episodes past theirs."""
    report = report or Report()
    for parent in PERIODS:
        cutoff = now - timedelta(days=retention.days(parent))
        for partition in await partitions(conn, parent):
            if partition.end <= cutoff:
                await drop(conn, partition)
                report.dropped.append(partition.name)
                log.info("dropped partition %s (%s to %s): past the %d days of %s", partition.name,
                         partition.start.date(), partition.end.date(), retention.days(parent), parent)
    report.episodes_deleted = await delete_old_episodes(conn, now - timedelta(days=retention.episodes))
    return report


async def run_round(conn: psycopg.AsyncConnection[Any], now: datetime, retention: Retention,
                    ahead_days: int) -> Report | None:
    """One maintenance round on `conn` (autocommit); None when another process holds the maintenance lock."""
    locked = (await db.one_row(conn, "SELECT pg_try_advisory_lock(%s)", [MAINTENANCE_LOCK]))[0]
    if not locked:
        return None
    try:
        report = Report(created=await ensure_ahead(conn, now, ahead_days))
        return await apply_retention(conn, now, retention, report)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", [MAINTENANCE_LOCK])


class NoPartition(RuntimeError):
    """A row's partition was dropped after this process last saw it (retention): retry, it is created again."""


def is_missing_partition(exc: psycopg.Error) -> bool:
    diag = getattr(exc, "diag", None)
    return isinstance(exc, psycopg.errors.CheckViolation) and bool(
        diag and (diag.message_primary or "").startswith("no partition of relation"))


class Partitions:
    """The partitions this process knows exist; ingest asks for those a batch needs."""

    def __init__(self) -> None:
        self._known: set[tuple[str, datetime]] = set()
        self.created_on_demand = 0

    @staticmethod
    def needed(batch: IngestBatch) -> set[tuple[str, datetime]]:
        # The UTC days first, as integers (a batch's thousands of windows fall in a day or two): one subtraction per
        # record instead of a conversion and two datetimes.
        summary_days = {_utc_day(s.window_start) for s in batch.summaries}
        event_days = {_utc_day(e.ts) for e in batch.events}
        keys = set()
        for day in summary_days:
            start = _EPOCH + timedelta(days=day)
            keys.add(("summaries", start))
            keys.add(("summaries_hourly", start.replace(day=1)))
        for day in event_days:
            keys.add(("events", (_EPOCH + timedelta(days=day)).replace(day=1)))
        return keys

    async def ensure_for(self, conn: psycopg.AsyncConnection[Any], batch: IngestBatch) -> None:
        missing = self.needed(batch) - self._known
        if not missing:
            return
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{ENSURE_LOCK_TIMEOUT}'")
            existing = {(parent, p.start) for parent in {k[0] for k in missing}
                        for p in await partitions(conn, parent)}
            for parent, start in sorted(missing - existing):
                name = await ensure(conn, parent, start)
                self.created_on_demand += 1
                log.info("created partition %s on demand (a batch held %s)", name, start.date())
        self._known |= missing

    def forget(self) -> None:
        """After a missing-partition error: ask the database again next time."""
        self._known.clear()


class Maintenance:
    """The lifespan's maintenance task (module docstring). `clock` for tests; `interval_s` 0: no task."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.retention = Retention.from_settings(settings)
        self.ahead_days = settings.partitions_ahead_days
        self.interval_s = settings.maintenance_interval_s
        self.clock = clock
        self.failed_rounds = 0
        self.last: Report | None = None
        self._task = Supervised("partition maintenance", self._loop, max_backoff_s=600.0)
        self._pool: AsyncConnectionPool[Any] | None = None

    def start(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool
        if self.interval_s > 0:
            self._task.start()

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (the database gone, a lock: logged, counted, tried again)
                self.failed_rounds += 1
                text = first_line(exc)
                log.warning("partition maintenance round failed (%d so far): %s", self.failed_rounds, text)
            await asyncio.sleep(self.interval_s)

    async def run_once(self, now: datetime | None = None) -> Report | None:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            report = await run_round(conn, now or self.clock(), self.retention, self.ahead_days)
        if report is not None:
            self.last = report
            if report.created or report.dropped or report.episodes_deleted:
                log.info("partition maintenance: %s", report)
        return report

    async def stop(self) -> None:
        await self._task.stop()


async def maintain_once(settings: Settings, now: datetime | None = None) -> Report | None:
    """One round on a connection of its own (`pdm-central maintain`); DatabaseUnavailable when PostgreSQL is not
    there; None when another process's round is running."""
    from central import db

    url, extra = db.conninfo_kwargs(settings)
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **extra)
    except psycopg.OperationalError as exc:
        raise db.unavailable(exc) from exc
    async with conn:
        return await run_round(conn, now or utc_now(), Retention.from_settings(settings),
                               settings.partitions_ahead_days)
