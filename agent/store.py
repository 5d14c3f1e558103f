"""The agent's durable buffer: scored readings, rejected readings and counters in one SQLite file (SPEC §8).

Who calls it: the ingest pipeline opens one `Store` per data directory and writes each batch with `write()`
(group commit); the status API, the retention job and the sync client read and prune through the same `Store`.
Every method holds an internal lock for at most one transaction, so one `Store` may be shared by threads.
There is one writer: do not open the same file with a second `Store`.

Guarantees
- A reading is accepted once `write()` has returned: its transaction committed together with the quarantined
  readings and the counters of the same batch. A write that fails stores nothing of its batch.
- A reading redelivered with the same (machine_id, ts) is stored once and counted as a duplicate.
- The quarantine keeps the newest `quarantine_cap` rejected readings, and no more than `quarantine_max_bytes` of
  them (source, machine id, message and payload, each cut to its limit). The write that goes beyond either cap
  deletes the oldest in its own transaction and adds them to the `quarantine_evicted` counter.
- At the buffer cap (`enforce_cap`) the quarantine goes first: a rejected reading never costs a valid one.
- Durability in WAL mode, chosen with `synchronous`:
  - "NORMAL" (default): every committed transaction survives a crash of the process (kill -9, OOM killer),
    because it is already in the WAL file in the OS page cache. On power loss or a kernel crash the transactions
    committed since the WAL was last fsynced (at each checkpoint) may be lost, but the database stays consistent
    and opens cleanly. About 50k commits/s on the reference disk.
  - "FULL": the WAL is fsynced at every commit, so committed transactions also survive power loss. About 8k
    commits/s on the reference disk, and far fewer on gateway flash.

Counters (durable, in the same transactions as the data they count): `BufferCounters` (agent/counters.py).

Schema: `PRAGMA user_version` is the number of `MIGRATIONS` applied. `open()` applies the missing ones in order,
one transaction each, so a database of any older version is upgraded in place; a newer one is refused.
Never edit a migration that has shipped: append a new one.

Errors: every `sqlite3.Error` is raised as `StoreError` saying what failed, on which file, chained to the cause.
Invalid arguments to `open()` raise `ValueError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic_core import to_json

from agent import counters
from agent.actions import ACTION_TABLES
from agent.counters import BufferCounters
from drivers.base import SOURCE_MAX_CHARS, cut
from sync.outbox import Record

SYNCHRONOUS_LEVELS = ("NORMAL", "FULL")
DEFAULT_QUARANTINE_CAP = 10_000
DEFAULT_QUARANTINE_MAX_BYTES = 50 * 2**20
PAYLOAD_LIMIT_BYTES = 4096
MESSAGE_MAX_CHARS = 1024  # of a rejection's message
MACHINE_ID_MAX_CHARS = 64
RETENTION_CHUNK_ROWS = 5_000
CAP_CHUNK_ROWS = 1_000
BUSY_TIMEOUT_MS = 5_000

# One tuple of statements per schema version. Statements rather than one script for executescript(), which
# commits any open transaction first and so could not apply a migration atomically.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            machine_id TEXT NOT NULL,
            ts REAL NOT NULL,
            "values" TEXT NOT NULL,
            machine_type TEXT NOT NULL,
            p_failure REAL NOT NULL,
            risk TEXT NOT NULL,
            health REAL NOT NULL,
            state TEXT NOT NULL,
            ood TEXT NOT NULL,
            model_version TEXT NOT NULL,
            received_at REAL NOT NULL,
            UNIQUE (machine_id, ts)
        )""",
        """CREATE TABLE quarantine (
            id INTEGER PRIMARY KEY,
            received_at REAL NOT NULL,
            source TEXT NOT NULL,
            machine_id TEXT,
            reason TEXT NOT NULL,
            message TEXT NOT NULL,
            payload TEXT NOT NULL
        )""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ),
    ("CREATE INDEX readings_by_ts ON readings (ts)",),  # retention deletes by ts across machines
    (
        # What the sync client sends: events and summaries, written in the transaction that produced them.
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('event', 'summary')),
            record_id TEXT NOT NULL UNIQUE,
            machine_id TEXT NOT NULL,
            at REAL NOT NULL,
            body TEXT NOT NULL,
            created_at REAL NOT NULL,
            synced_at REAL
        )""",
        "CREATE INDEX outbox_pending ON outbox (kind, id) WHERE synced_at IS NULL",
        # Records central refused as invalid, kept with its reason instead of being retried for ever.
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            record_id TEXT NOT NULL,
            body TEXT NOT NULL,
            reason TEXT NOT NULL,
            set_aside_at REAL NOT NULL
        )""",
        # Per machine: its alarm state machine and its open summary window (JSON), saved with each batch.
        "CREATE TABLE machines (machine_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at REAL NOT NULL)",
    ),
    # The status API reads a machine's events newest first; partial, so the many summaries cost it nothing.
    ("CREATE INDEX outbox_events ON outbox (machine_id, at) WHERE kind = 'event'",),
    (
        # Each rejected reading's size, so the quarantine is bounded in bytes without measuring it at every write.
        "ALTER TABLE quarantine ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
        (
            "UPDATE quarantine SET bytes = length(CAST(source AS BLOB)) + coalesce(length(CAST(machine_id AS BLOB)), 0)"
            " + length(CAST(message AS BLOB)) + length(CAST(payload AS BLOB))"
        ),
    ),
    ACTION_TABLES,  # alarm episodes: what technicians did at this gateway, and what central says (agent/actions.py)
)
SCHEMA_VERSION = len(MIGRATIONS)

_READING_COLUMNS = (
    'machine_id, ts, "values", machine_type, p_failure, risk, health, state, ood, model_version, received_at'
)
_INSERT_READING = f"INSERT INTO readings ({_READING_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
_QUARANTINE_COLUMNS = "received_at, source, machine_id, reason, message, payload"
_INSERT_QUARANTINE = f"INSERT INTO quarantine ({_QUARANTINE_COLUMNS}, bytes) VALUES (?,?,?,?,?,?,?)"
_EVICT_QUARANTINE = "DELETE FROM quarantine WHERE id <= (SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)"
# The newest rows whose sizes add up to the budget stay; every older one goes.
_EVICT_QUARANTINE_BYTES = (
    "DELETE FROM quarantine WHERE id <= (SELECT id FROM (SELECT id, sum(bytes) OVER (ORDER BY id DESC) AS kept"
    " FROM quarantine) WHERE kept > ? ORDER BY id DESC LIMIT 1)"
)
_INSERT_OUTBOX = (
    "INSERT INTO outbox (kind, record_id, machine_id, at, body, created_at) VALUES (?,?,?,?,?,?)"
    " ON CONFLICT (record_id) DO NOTHING"
)
# The oldest pending record is the first one written (ids follow the writes): its kind's first entry in the partial
# index outbox_pending, not min(created_at) over every pending row (12 -> 2 ms with 80,000 pending, at each /status).
_BACKLOG = (
    "SELECT (SELECT count(*) FROM outbox WHERE synced_at IS NULL), (SELECT min(created_at) FROM ("
    " SELECT * FROM (SELECT created_at FROM outbox WHERE synced_at IS NULL AND kind = 'event' ORDER BY id LIMIT 1)"
    " UNION ALL"
    " SELECT * FROM (SELECT created_at FROM outbox WHERE synced_at IS NULL AND kind = 'summary' ORDER BY id LIMIT 1)))"
)
_SAVE_MACHINE = (
    "INSERT INTO machines (machine_id, state, updated_at) VALUES (?,?,?)"
    " ON CONFLICT (machine_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
)
_ADD_TO_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


LOOKUP_SIZES = (1, 8, 32, 128, 400)  # (machine_id, ts) pairs in one `stored()` statement
# CROSS JOIN keeps the keys outside, one index lookup each (IN (VALUES ...) scanned the whole index: 15.6 ms per 400)
_LOOKUPS = {size: "WITH k(machine_id, ts) AS (VALUES " + ",".join(["(?,?)"] * size) + ") SELECT r.machine_id, r.ts "
                  "FROM k CROSS JOIN readings AS r ON r.machine_id = k.machine_id AND r.ts = k.ts"
            for size in LOOKUP_SIZES}


class StoreError(Exception):
    """The buffer could not be opened, read or written; the message names the operation and the file."""


@dataclass(slots=True)  # read-only by convention: frozen, its __init__ cost 1.5 us more per reading committed
class StoredReading:
    machine_id: str
    ts: float  # epoch seconds, UTC, as measured
    values: dict[str, float]  # the model inputs
    machine_type: str
    p_failure: float
    risk: dict[str, float]  # per failure mode
    health: float
    state: str
    ood: tuple[str, ...]  # inputs outside the training range
    model_version: str
    received_at: float  # epoch seconds, UTC


@dataclass(frozen=True, slots=True)
class QuarantinedReading:
    received_at: float
    source: str  # where it came from, e.g. "mqtt:pdm/m1/telemetry" or "modbus:m1"; stored cut to SOURCE_MAX_CHARS
    machine_id: str | None  # None when the payload did not say
    reason: str  # the stable rejection reason code
    message: str  # stored cut to MESSAGE_MAX_CHARS
    payload: str  # stored truncated to PAYLOAD_LIMIT_BYTES of UTF-8


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    kind: str  # "event" | "summary"
    record_id: str  # the record's deterministic id: writing it twice stores it once
    machine_id: str
    at: float  # the event's time, or the summary window's start
    body: str  # the record as JSON of the sync protocol
    created_at: float


@dataclass(frozen=True, slots=True)
class MachineRecord:
    machine_id: str
    state: str  # JSON
    updated_at: float


@dataclass(frozen=True, slots=True)
class WriteResult:
    new: int
    duplicates: int
    quarantined: int


class Store:
    """The SQLite buffer. Create with `Store.open()`; close with `close()` or a `with` block."""

    def __init__(self, path: Path, connection: sqlite3.Connection, quarantine_cap: int,
                 quarantine_max_bytes: int = DEFAULT_QUARANTINE_MAX_BYTES) -> None:
        self.path = path
        self.quarantine_cap = quarantine_cap
        self.quarantine_max_bytes = quarantine_max_bytes
        self._connection: sqlite3.Connection | None = connection
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, path: Path, *, synchronous: str = "NORMAL", quarantine_cap: int = DEFAULT_QUARANTINE_CAP,
        quarantine_max_bytes: int = DEFAULT_QUARANTINE_MAX_BYTES,
    ) -> Self:
        """Open or create the buffer at `path` and migrate its schema to SCHEMA_VERSION."""
        level = str(synchronous).upper()
        if level not in SYNCHRONOUS_LEVELS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_LEVELS)}, not {synchronous!r}")
        if quarantine_cap < 1:
            raise ValueError(f"quarantine_cap must be at least 1, not {quarantine_cap}")
        if quarantine_max_bytes < 1:
            raise ValueError(f"quarantine_max_bytes must be at least 1, not {quarantine_max_bytes}")
        path = Path(path)
        try:
            _create_private(path)
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{getattr(exc, 'strerror', None) or exc} opening {path}") from exc
        store = cls(path, connection, quarantine_cap, quarantine_max_bytes)
        try:
            with store._guard("opening"):
                _configure(connection, level)
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(
        self,
        scored: Sequence[StoredReading],
        rejected: Sequence[QuarantinedReading],
        outbox: Sequence[OutboxRecord] = (),
        machines: Sequence[MachineRecord] = (),
    ) -> WriteResult:
        """Store a batch in one transaction, with the events, summaries and machine states it produced; its
        readings are accepted once this returns."""
        if not (scored or rejected or outbox or machines):
            return WriteResult(0, 0, 0)
        with self._transaction("writing") as connection:
            connection.executemany(_INSERT_OUTBOX, [
                (r.kind, r.record_id, r.machine_id, r.at, r.body, r.created_at) for r in outbox])
            connection.executemany(_SAVE_MACHINE, [(m.machine_id, m.state, m.updated_at) for m in machines])
            new = connection.executemany(_INSERT_READING, map(_reading_row, scored)).rowcount
            evicted = self._quarantine(connection, rejected) if rejected else 0
            counts = Counter({counters.ACCEPTED: new, counters.DUPLICATE: len(scored) - new})
            counts.update(counters.rejected(reading.reason) for reading in rejected)
            counts[counters.EVICTED] += evicted
            connection.executemany(_ADD_TO_COUNTER, counters.as_rows(counts))
        return WriteResult(new, len(scored) - new, len(rejected))

    def latest_by_machine(self) -> dict[str, StoredReading]:
        """The newest reading (by ts) of every machine.

        Machine by machine along the (machine_id, ts) index, so it costs O(machines), not O(readings) as a GROUP BY
        would: 0.6 s with 1,000,000 readings of 500 machines."""
        sql = (
            "WITH RECURSIVE machine(mid) AS (SELECT min(machine_id) FROM readings UNION ALL"
            " SELECT (SELECT min(machine_id) FROM readings WHERE machine_id > mid) FROM machine WHERE mid IS NOT NULL)"
            f" SELECT {_READING_COLUMNS} FROM machine JOIN readings"
            " ON readings.id = (SELECT id FROM readings WHERE machine_id = mid ORDER BY ts DESC LIMIT 1)"
        )
        with self._guard("reading latest readings from") as connection:
            rows = connection.execute(sql).fetchall()
        return {row[0]: _stored_reading(row) for row in rows}

    def history(self, machine_id: str, since_ts: float, limit: int) -> list[StoredReading]:
        """The newest `limit` readings of a machine with ts >= since_ts, oldest first."""
        sql = (
            f"SELECT * FROM (SELECT {_READING_COLUMNS} FROM readings WHERE machine_id = ? AND ts >= ?"
            " ORDER BY ts DESC LIMIT ?) ORDER BY ts"
        )
        with self._guard("reading history from") as connection:
            rows = connection.execute(sql, (machine_id, since_ts, limit)).fetchall()
        return [_stored_reading(row) for row in rows]

    def trend(self, machine_id: str, limit: int) -> list[tuple[float, float]]:
        """(ts, health) of a machine's newest `limit` readings, oldest first; without decoding the readings, which
        would cost a hundred times more."""
        sql = ("SELECT * FROM (SELECT ts, health FROM readings WHERE machine_id = ? ORDER BY ts DESC LIMIT ?)"
               " ORDER BY ts")
        with self._guard("reading a trend from") as connection:
            return connection.execute(sql, (machine_id, limit)).fetchall()

    def healths_after(self, after_id: int, limit: int) -> list[tuple[int, str, float, float]]:
        """(id, machine_id, ts, health) of the readings stored after the one with id `after_id` (the newest `limit`
        of them), in the order they were stored: what a view kept in memory reads to catch up."""
        sql = ("SELECT * FROM (SELECT id, machine_id, ts, health FROM readings WHERE id > ? ORDER BY id DESC LIMIT ?)"
               " ORDER BY id")
        with self._guard("reading new readings from") as connection:
            return connection.execute(sql, (after_id, limit)).fetchall()

    def stored(self, keys: Sequence[tuple[str, float]]) -> set[tuple[str, float]]:
        """Which of these (machine_id, ts) are already stored: what a redelivery would only duplicate."""
        found: set[tuple[str, float]] = set()
        with self._guard("looking up readings in") as connection:
            for i in range(0, len(keys), LOOKUP_SIZES[-1]):  # SQLite allows 32,766 variables; stay far below
                chunk = keys[i:i + LOOKUP_SIZES[-1]]
                size = next(size for size in LOOKUP_SIZES if size >= len(chunk))
                # Padded with its last key to one of a few sizes: the connection's statement cache then holds a
                # few of these statements, not one per batch size (each prepared one of hundreds of rows costs tens
                # of kB: 9 MB for 128 sizes).
                chunk = [*chunk, *[chunk[-1]] * (size - len(chunk))]
                found.update(connection.execute(_LOOKUPS[size], [v for key in chunk for v in key]))
        return found

    def machines(self, path: str | None = None, machine_id: str | None = None) -> dict[str, Any]:
        """Every machine's saved state (JSON), by machine id, or only that of `machine_id`; with a JSON `path` such as
        "$.alarm.state", only the value there (None where the state is not JSON), picked out by SQLite at a fraction
        of decoding the states."""
        sql = ("SELECT machine_id, state FROM machines" if path is None else
               "SELECT machine_id, CASE WHEN json_valid(state) THEN json_extract(state, ?) END FROM machines")
        params: tuple[str, ...] = () if path is None else (path,)
        if machine_id is not None:
            sql, params = sql + " WHERE machine_id = ?", (*params, machine_id)
        with self._guard("reading machine states from") as connection:
            return dict(connection.execute(sql, params))

    def outbox(self, kind: str | None = None, pending: bool = True) -> list[OutboxRecord]:
        """Outbox records, oldest first: the pending ones (not yet accepted by central) or all."""
        sql = ("SELECT kind, record_id, machine_id, at, body, created_at FROM outbox WHERE (? IS NULL OR kind = ?)"
               + (" AND synced_at IS NULL" if pending else "") + " ORDER BY id")
        with self._guard("reading the outbox of") as connection:
            return [OutboxRecord(*row) for row in connection.execute(sql, (kind, kind))]

    def events(self, machine_id: str | None = None, since: float | None = None,
               limit: int = 100) -> list[tuple[OutboxRecord, bool]]:
        """Events in the outbox (synced or not, until forgotten), newest first by `at` (then the last written
        first), of one machine or all, with `at >= since`; each with whether central has accepted it."""
        conditions, params = ["kind = 'event'"], list[str | float | int]()
        if machine_id is not None:
            conditions.append("machine_id = ?")
            params.append(machine_id)
        if since is not None:
            conditions.append("at >= ?")
            params.append(since)
        sql = ("SELECT kind, record_id, machine_id, at, body, created_at, synced_at IS NOT NULL FROM outbox"
               f" WHERE {' AND '.join(conditions)} ORDER BY at DESC, id DESC LIMIT ?")
        with self._guard("reading events from") as connection:
            return [(OutboxRecord(*row[:6]), bool(row[6])) for row in connection.execute(sql, (*params, limit))]

    def pending(self, limit: int) -> list[OutboxRecord]:
        """The next records to sync: events first, then summaries, oldest first."""
        sql = ("SELECT kind, record_id, machine_id, at, body, created_at FROM outbox WHERE synced_at IS NULL"
               " ORDER BY kind = 'summary', id LIMIT ?")
        with self._guard("reading the outbox of") as connection:
            return [OutboxRecord(*row) for row in connection.execute(sql, (limit,))]

    def mark_synced(self, record_ids: Sequence[str], at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._transaction("marking synced records in") as connection:
            connection.executemany("UPDATE outbox SET synced_at = ? WHERE record_id = ?",
                                   [(at, record_id) for record_id in record_ids])

    def set_aside(self, records: Sequence[Record], reason: str, at: float | None = None) -> None:
        """Move records central refused as invalid to the dead letters, with the reason."""
        at = time.time() if at is None else at
        with self._transaction("setting records aside in") as connection:
            connection.executemany(
                "INSERT INTO dead_letters (kind, record_id, body, reason, set_aside_at) VALUES (?,?,?,?,?)",
                [(r.kind, r.record_id, r.body, reason, at) for r in records])
            connection.executemany("DELETE FROM outbox WHERE record_id = ?", [(r.record_id,) for r in records])
            connection.executemany(_ADD_TO_COUNTER, Counter(counters.set_aside(r.kind) for r in records).items())

    def outbox_backlog(self) -> tuple[int, float | None]:
        """(records not yet accepted by central, when the oldest of them was written)."""
        with self._guard("reading the outbox of") as connection:
            count, oldest = connection.execute(_BACKLOG).fetchone()
        return count, oldest

    def delete_synced_before(self, at: float) -> int:
        """Forget records central accepted before `at`."""
        with self._transaction("deleting synced records from") as connection:
            return connection.execute("DELETE FROM outbox WHERE synced_at < ?", (at,)).rowcount

    def counters(self) -> BufferCounters:
        with self._guard("reading counters from") as connection:
            return BufferCounters.parse(connection.execute("SELECT name, value FROM counters ORDER BY name"))

    def quarantine(self, limit: int) -> list[QuarantinedReading]:
        """The newest `limit` rejected readings, newest first."""
        sql = f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine ORDER BY id DESC LIMIT ?"
        with self._guard("reading quarantine from") as connection:
            return [QuarantinedReading(*row) for row in connection.execute(sql, (limit,))]

    def size_bytes(self) -> int:
        """Size of the main database file: page_count * page_size.

        Includes free pages (space of deleted rows, reused by later writes but not given back to the file system)
        and excludes the -wal file, which checkpoints keep near its autocheckpoint size (about 4 MB).
        """
        with self._guard("measuring") as connection:
            page_count: int = connection.execute("PRAGMA page_count").fetchone()[0]
            page_size: int = connection.execute("PRAGMA page_size").fetchone()[0]
        return page_count * page_size

    def used_bytes(self) -> int:
        """Bytes of pages holding data: what grows toward the buffer cap (free pages are reused first)."""
        with self._guard("measuring") as connection:
            used: int = connection.execute(
                "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count, pragma_freelist_count,"
                " pragma_page_size").fetchone()[0]
        return used

    def enforce_cap(self, max_bytes: int) -> dict[str, int]:
        """Make room under `max_bytes`, in this order: drop the oldest rejected readings (the quarantine), forget
        synced records, drop the oldest raw readings, and only as a last resort the oldest unsynced summaries.
        Unsynced events are never dropped. Every drop is counted (`dropped_quarantine`, `dropped_readings`,
        `dropped_summaries`); returns the drops of this call."""
        dropped: Counter[str] = Counter()
        steps = (
            ("quarantine", "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?)"),
            (None, "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE synced_at IS NOT NULL LIMIT ?)"),
            ("readings", "DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY ts LIMIT ?)"),
            ("summaries", ("DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE synced_at IS NULL"
                           " AND kind = 'summary' ORDER BY id LIMIT ?)")),
        )
        for kind, sql in steps:
            while self.used_bytes() > max_bytes:
                with self._transaction("making room in") as connection:
                    deleted = connection.execute(sql, (CAP_CHUNK_ROWS,)).rowcount
                    if kind and deleted:
                        connection.execute(_ADD_TO_COUNTER, (counters.dropped(kind), deleted))
                dropped[kind or "synced"] += deleted
                if not deleted:
                    break
        return {kind: n for kind, n in dropped.items() if kind != "synced" and n}

    def integrity_ok(self) -> bool:
        with self._guard("checking integrity of") as connection:
            return connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    def delete_readings_before(self, ts: float) -> int:
        """Delete readings with ts < `ts`, RETENTION_CHUNK_ROWS per transaction so writes can interleave."""
        sql = "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE ts < ? LIMIT ?)"
        deleted = 0
        while True:
            with self._transaction("deleting old readings from") as connection:
                chunk = connection.execute(sql, (ts, RETENTION_CHUNK_ROWS)).rowcount
            deleted += chunk
            if chunk < RETENTION_CHUNK_ROWS:
                return deleted

    def _quarantine(self, connection: sqlite3.Connection, rejected: Sequence[QuarantinedReading]) -> int:
        """Insert rejected readings, then evict the oldest beyond either cap; returns how many were evicted."""
        connection.executemany(_INSERT_QUARANTINE, map(_quarantine_row, rejected))
        evicted = connection.execute(_EVICT_QUARANTINE, (self.quarantine_cap,)).rowcount
        return evicted + connection.execute(_EVICT_QUARANTINE_BYTES, (self.quarantine_max_bytes,)).rowcount

    def _migrate(self) -> None:
        while True:
            with self._transaction("migrating") as connection:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}:"
                        " upgrade the agent or move the file aside"
                    )
                if version == SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[version]:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {version + 1}")

    def reading(self, action: str) -> AbstractContextManager[sqlite3.Connection]:
        """The connection, for reads by code beside the store (agent/actions.py); errors as StoreError."""
        return self._guard(action)

    def transaction(self, action: str) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT) for code beside the store; errors as StoreError."""
        return self._transaction(action)

    @contextmanager
    def _guard(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and map SQLite errors to StoreError, e.g. 'database or disk is full writing <path>'."""
        with self._lock:
            if self._connection is None:
                raise StoreError(f"{action} {self.path}: the store is closed")
            try:
                yield self._connection
            except sqlite3.Error as exc:
                raise StoreError(f"{exc} {action} {self.path}") from exc

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._guard(action) as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    connection.rollback()


def _configure(connection: sqlite3.Connection, synchronous: str) -> None:
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (journal_mode is {mode})")
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute(f"PRAGMA synchronous = {synchronous}")


def _reading_row(r: StoredReading) -> tuple[Any, ...]:
    # pydantic-core's encoder: a fifth of json.dumps's time; compact JSON that json.loads reads to the same floats.
    return (r.machine_id, r.ts, to_json(r.values, inf_nan_mode="constants").decode(), r.machine_type, r.p_failure,
            to_json(r.risk, inf_nan_mode="constants").decode(), r.health, r.state,
            to_json(r.ood).decode() if r.ood else "[]", r.model_version, r.received_at)


def _stored_reading(row: tuple[Any, ...]) -> StoredReading:
    machine_id, ts, values, machine_type, p_failure, risk, health, state, ood, model_version, received_at = row
    return StoredReading(
        machine_id,
        ts,
        json.loads(values),
        machine_type,
        p_failure,
        json.loads(risk),
        health,
        state,
        tuple(json.loads(ood)),
        model_version,
        received_at,
    )


def _quarantine_row(reading: QuarantinedReading) -> tuple[Any, ...]:
    # Cut on a byte boundary and drop a character split by the cut; undecodable text is kept as escapes.
    payload = reading.payload.encode("utf-8", "backslashreplace")[:PAYLOAD_LIMIT_BYTES].decode("utf-8", "ignore")
    source, message = cut(reading.source, SOURCE_MAX_CHARS), cut(reading.message, MESSAGE_MAX_CHARS)
    machine_id = None if reading.machine_id is None else cut(reading.machine_id, MACHINE_ID_MAX_CHARS)
    size = sum(len(text.encode("utf-8", "backslashreplace")) for text in (source, machine_id or "", message, payload))
    return (reading.received_at, source, machine_id, reading.reason, message, payload, size)


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only, whatever the umask: SQLite gives its -wal and -shm files
    the database file's mode. An existing file keeps the mode it has (the operator's choice)."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
