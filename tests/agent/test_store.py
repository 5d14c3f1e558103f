"""agent.store on real SQLite files: group commit, duplicates, quarantine cap, counters, migration, retention,
and crash safety of a writer killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.counters import BufferCounters
from agent.store import (
    MACHINE_ID_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    MIGRATIONS,
    PAYLOAD_LIMIT_BYTES,
    RETENTION_CHUNK_ROWS,
    SCHEMA_VERSION,
    QuarantinedReading,
    Store,
    StoredReading,
    StoreError,
    WriteResult,
)
from drivers.base import CUT_MARK, SOURCE_MAX_CHARS

REPO = Path(__file__).resolve().parents[2]


def reading(machine_id: str | None = "m1", ts: float = 1000.0, **changes) -> StoredReading:
    fields = {
        "machine_id": machine_id,
        "ts": ts,
        "values": {"air_temperature_k": 300.1, "process_temperature_k": 310.2, "torque_nm": 40.5},
        "machine_type": "M",
        "p_failure": 0.12,
        "risk": {"TWF": 0.01, "HDF": 0.1, "PWF": 0.02, "OSF": 0.03},
        "health": 88.0,
        "state": "ok",
        "ood": (),
        "model_version": "1.0.0",
        "received_at": ts + 0.25,
    }
    return StoredReading(**(fields | changes))


def rejected(message: str = "torque_nm -5 is below 0", **changes) -> QuarantinedReading:
    fields = {
        "received_at": 1000.0,
        "source": "mqtt:pdm/m1/telemetry",
        "machine_id": "m1",
        "reason": "out_of_range",
        "message": message,
        "payload": '{"torque_nm": -5}',
    }
    return QuarantinedReading(**(fields | changes))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def store(db: Path):
    with Store.open(db) as store:
        yield store


def test_group_write_stores_scores_and_quarantine(store: Store) -> None:
    scored = [reading("m1", ood=("torque_nm",)), reading("m2", state="alarm", p_failure=0.8)]
    bad = rejected(machine_id=None, reason="malformed", payload="{not json")

    assert store.write(scored, [bad]) == WriteResult(new=2, duplicates=0, quarantined=1)

    assert store.latest_by_machine() == {"m1": scored[0], "m2": scored[1]}
    assert store.quarantine(limit=10) == [bad]
    assert store.counters() == BufferCounters(readings_accepted=2, rejected={"malformed": 1})


def test_redelivered_reading_is_stored_once_and_counted(store: Store) -> None:
    store.write([reading(ts=1.0), reading(ts=2.0)], [])

    redelivered = [reading(ts=2.0, p_failure=0.9), reading(ts=3.0), reading(ts=3.0)]
    assert store.write(redelivered, []) == WriteResult(new=1, duplicates=2, quarantined=0)

    history = store.history("m1", since_ts=0.0, limit=10)
    assert [r.ts for r in history] == [1.0, 2.0, 3.0]
    assert history[1].p_failure == 0.12  # the first delivery is kept
    assert store.counters() == BufferCounters(readings_accepted=3, readings_duplicate=2)


def test_stored_tells_which_readings_a_redelivery_would_duplicate(store: Store) -> None:
    """What the pipeline asks before counting a batch into summaries and alarms: more keys than one query takes."""
    store.write([reading(machine_id=f"m{i % 3}", ts=float(i)) for i in range(1000)], [])
    asked = [(f"m{i % 3}", float(i)) for i in range(900, 1100)] + [("m1", 0.0), ("m0", 0.0), ("m0", 0.0)]
    assert store.stored(asked * 3) == {(f"m{i % 3}", float(i)) for i in range(900, 1000)} | {("m0", 0.0)}


@pytest.mark.parametrize("asked", [1, 2, 9, 33, 129, 401, 850])
def test_stored_tells_which_keys_are_stored_whatever_their_number(store: Store, asked: int) -> None:
    store.write([reading("m1", ts=float(ts)) for ts in range(0, 900, 2)], [])  # even ts only

    keys = [("m1", float(ts)) for ts in range(asked)] + [("m2", 0.0)]
    assert store.stored(keys) == {("m1", float(ts)) for ts in range(0, asked, 2)}


def test_failed_write_stores_nothing_of_its_batch(store: Store, db: Path) -> None:
    broken = reading(machine_id=None, ts=2.0)

    with pytest.raises(StoreError, match=f"NOT NULL constraint failed: readings.machine_id writing {db}"):
        store.write([reading(ts=1.0), broken], [rejected()])

    assert store.latest_by_machine() == {}
    assert store.quarantine(limit=10) == []
    assert store.counters() == BufferCounters()
    assert store.write([reading(ts=1.0)], []).new == 1


def test_quarantine_cap_evicts_oldest_and_counts(db: Path) -> None:
    with Store.open(db, quarantine_cap=3) as store:
        store.write([], [rejected("r1"), rejected("r2")])
        store.write([], [rejected("r3"), rejected("r4", reason="missing_input"), rejected("r5")])

        assert [r.message for r in store.quarantine(limit=10)] == ["r5", "r4", "r3"]
        assert store.counters() == BufferCounters(quarantine_evicted=2,
                                                  rejected={"missing_input": 1, "out_of_range": 4})


def test_a_junk_topic_and_message_are_stored_cut_and_marked(store: Store) -> None:
    # Issue 22 item 1: 65 KB topics made 65 KB quarantine rows, which no cap trimmed.
    store.write([], [rejected("m" * 70_000, source="mqtt:" + "x" * 65_000, machine_id="y" * 65_000)])

    kept = store.quarantine(limit=1)[0]
    assert len(kept.source) == SOURCE_MAX_CHARS and kept.source.startswith("mqtt:xxx") and kept.source.endswith(CUT_MARK)
    assert len(kept.message) == MESSAGE_MAX_CHARS and kept.message.endswith(CUT_MARK)
    assert len(kept.machine_id) == MACHINE_ID_MAX_CHARS


def test_the_quarantine_is_bounded_in_bytes_keeping_the_newest(db: Path) -> None:
    row = len("mqtt:pdm/m1/telemetry") + len("m1") + 1000 + 4000
    with Store.open(db, quarantine_max_bytes=10 * row) as store:
        for i in range(30):
            store.write([], [rejected(f"{i:04d}" + "m" * 996, payload="p" * 4000)])

        kept = store.quarantine(limit=100)
        assert [r.message[:4] for r in kept] == [f"{i:04d}" for i in range(29, 19, -1)]
        assert store.counters().quarantine_evicted == 20


def test_at_the_buffer_cap_the_quarantine_goes_before_any_reading(tmp_path) -> None:
    with Store.open(tmp_path / "cap.db", quarantine_max_bytes=2**30) as store:
        store.write([reading(ts=float(i)) for i in range(500)], [])
        with_readings = store.used_bytes()
        for _ in range(20):
            store.write([], [rejected(payload="p" * 4000) for _ in range(100)])
        assert store.used_bytes() > with_readings + 4_000_000

        dropped = store.enforce_cap(with_readings + 1_000_000)

        assert set(dropped) == {"quarantine"} and store.counters().dropped["quarantine"] == dropped["quarantine"]
        assert len(store.history("m1", 0, 10**6)) == 500  # no valid reading paid for the junk


def test_quarantined_payload_is_truncated_to_4_kib_of_utf8(store: Store) -> None:
    store.write([], [rejected(payload="é" * PAYLOAD_LIMIT_BYTES)])

    payload = store.quarantine(limit=1)[0].payload
    assert payload == "é" * (PAYLOAD_LIMIT_BYTES // 2)
    assert len(payload.encode()) == PAYLOAD_LIMIT_BYTES


def test_counters_survive_reopen(db: Path) -> None:
    with Store.open(db) as store:
        store.write([reading(ts=1.0), reading(ts=1.0)], [rejected()])
    with Store.open(db) as store:
        store.write([reading(ts=2.0)], [])
        assert store.counters() == BufferCounters(readings_accepted=2, readings_duplicate=1,
                                                  rejected={"out_of_range": 1})


def test_history_returns_newest_readings_since_ts_oldest_first(store: Store) -> None:
    store.write([reading("m1", ts=float(ts)) for ts in range(10)] + [reading("m2", ts=5.0)], [])

    assert [r.ts for r in store.history("m1", since_ts=3.0, limit=4)] == [6.0, 7.0, 8.0, 9.0]
    assert [r.ts for r in store.history("m1", since_ts=8.0, limit=100)] == [8.0, 9.0]
    assert {m: r.ts for m, r in store.latest_by_machine().items()} == {"m1": 9.0, "m2": 5.0}


names = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    machine_id=names,
    ts=finite,
    values=st.dictionaries(names, finite, max_size=6),
    risk=st.dictionaries(names, st.floats(0, 1), max_size=5),
    ood=st.lists(names, max_size=3).map(tuple),
)
def test_reading_reads_back_as_written(tmp_path_factory, machine_id, ts, values, risk, ood) -> None:
    written = reading(machine_id, ts, values=values, risk=risk, ood=ood)
    with Store.open(tmp_path_factory.mktemp("roundtrip") / "agent.db") as store:
        store.write([written], [])
        assert store.latest_by_machine() == {machine_id: written}
        assert store.history(machine_id, since_ts=ts, limit=1) == [written]


V1_READING = (
    'INSERT INTO readings (machine_id, ts, "values", machine_type, p_failure, risk, health, state, ood,'
    " model_version, received_at) VALUES ('m1', 1.0, '{\"torque_nm\": 40.5}', 'L', 0.5, '{\"TWF\": 0.5}', 50.0,"
    " 'warning', '[\"torque_nm\"]', '0.9.0', 1.5)"
)


@pytest.mark.parametrize("old_version", range(1, SCHEMA_VERSION))
def test_upgrade_from_older_schema_keeps_data(db: Path, old_version: int) -> None:
    old = sqlite3.connect(db)
    for statement in (s for migration in MIGRATIONS[:old_version] for s in migration):
        old.execute(statement)
    old.execute(V1_READING)
    old.execute("INSERT INTO counters (name, value) VALUES ('readings_accepted', 1)")
    old.execute(f"PRAGMA user_version = {old_version}")
    old.commit()
    old.close()

    with Store.open(db) as store:
        assert store.latest_by_machine()["m1"] == StoredReading(
            "m1", 1.0, {"torque_nm": 40.5}, "L", 0.5, {"TWF": 0.5}, 50.0, "warning", ("torque_nm",), "0.9.0", 1.5
        )
        store.write([reading(ts=2.0)], [])
        assert store.counters() == BufferCounters(readings_accepted=2)

    check = sqlite3.connect(db)
    assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    check.close()


def test_refuses_a_database_from_a_newer_agent(db: Path) -> None:
    newer = sqlite3.connect(db)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()

    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than"):
        Store.open(db)


def test_file_that_is_not_a_database_is_a_store_error(db: Path) -> None:
    db.write_bytes(b"this is a log file, not SQLite" * 100)

    with pytest.raises(StoreError, match=f"file is not a database opening {db}"):
        Store.open(db)


def test_quarantined_rows_from_before_the_byte_bound_count_toward_it(db: Path) -> None:
    old = sqlite3.connect(db)
    before = 4  # the schema before the byte bound (migration 5)
    for statement in (s for migration in MIGRATIONS[:before] for s in migration):
        old.execute(statement)
    old.executemany("INSERT INTO quarantine (received_at, source, machine_id, reason, message, payload)"
                    " VALUES (?, 'mqtt:t', NULL, 'malformed', 'm', ?)", [(float(i), "p" * 3000) for i in range(10)])
    old.execute(f"PRAGMA user_version = {before}")
    old.commit()
    old.close()

    with Store.open(db, quarantine_max_bytes=5 * 3010) as store:
        store.write([], [rejected(payload="p" * 3000)])
        assert len(store.quarantine(limit=100)) == 4  # the new one and the three newest old ones


def test_retention_deletes_only_older_readings(store: Store) -> None:
    total = RETENTION_CHUNK_ROWS * 2 + 500
    cut = float(RETENTION_CHUNK_ROWS * 2 + 100)  # more than one chunk to delete
    store.write([reading("m1", ts=float(ts)) for ts in range(total)], [])
    store.write([reading("m2", ts=0.0), reading("m2", ts=cut)], [])

    assert store.delete_readings_before(cut) == cut + 1

    assert store.history("m1", since_ts=0.0, limit=total)[0].ts == cut
    assert len(store.history("m1", since_ts=0.0, limit=total)) == total - cut
    assert [r.ts for r in store.history("m2", since_ts=0.0, limit=10)] == [cut]
    assert store.delete_readings_before(cut) == 0


def test_invalid_synchronous_names_the_allowed_values(db: Path) -> None:
    with pytest.raises(ValueError, match="synchronous must be one of NORMAL, FULL, not 'OFF'"):
        Store.open(db, synchronous="OFF")
    assert not db.exists()


def test_close_is_idempotent_and_a_closed_store_says_so(db: Path) -> None:
    store = Store.open(db, synchronous="FULL")
    store.close()
    store.close()

    with pytest.raises(StoreError, match="the store is closed"):
        store.write([reading()], [])


def test_size_and_integrity_of_a_fresh_store(store: Store) -> None:
    assert store.integrity_ok()
    assert store.size_bytes() > 0


BATCH = 100
WRITER = f"""
import sys
from pathlib import Path
from agent.store import QuarantinedReading, Store, StoredReading

path, next_ts, synchronous = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
values = {{"air_temperature_k": 300.1, "process_temperature_k": 310.2, "torque_nm": 40.5}}
risk = {{"TWF": 0.01, "HDF": 0.1, "PWF": 0.02, "OSF": 0.03}}
with Store.open(path, synchronous=synchronous) as store:
    while True:
        scored = [
            StoredReading("m1", float(ts), values, "M", 0.1, risk, 90.0, "ok", (), "1.0.0", float(ts))
            for ts in range(next_ts, next_ts + {BATCH})
        ]
        store.write(scored, [QuarantinedReading(0.0, "test", "m1", "out_of_range", "x", "{{}}")])
        next_ts += {BATCH}
        print(next_ts, flush=True)  # every ts below this is committed
"""


def run_writer_and_kill(db: Path, next_ts: int, synchronous: str, commits_before_kill: int) -> int:
    """Start a writer, SIGKILL it after it reported some commits; return the highest ts it reported committed."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(next_ts), synchronous],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    reported = [child.stdout.readline() for _ in range(commits_before_kill)]
    os.kill(child.pid, signal.SIGKILL)
    reported += child.stdout.readlines()  # printed after a commit, read after the kill: committed too
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr
    assert all(reported), f"writer stopped early: {stderr}"
    return int(reported[-1])


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_every_reported_commit_survives_sigkill_mid_write(db: Path, synchronous: str) -> None:
    next_ts = 0
    for commits_before_kill in (1, 7, 30, 90, 160):  # the later rounds also kill around WAL checkpoints
        reported = run_writer_and_kill(db, next_ts, synchronous, commits_before_kill)

        with Store.open(db) as store:
            assert store.integrity_ok()
            stored = [r.ts for r in store.history("m1", since_ts=0.0, limit=reported + 10 * BATCH)]
            assert len(stored) >= reported
            assert stored == [float(ts) for ts in range(len(stored))]
            assert len(stored) % BATCH == 0  # a batch is stored whole or not at all
            batches = len(stored) // BATCH
            assert store.counters() == BufferCounters(readings_accepted=len(stored),
                                                      rejected={"out_of_range": batches})
            assert len(store.quarantine(limit=batches + 10)) == batches
        next_ts = len(stored)


def test_the_buffer_cap_drops_synced_records_then_old_readings_then_summaries_never_events(tmp_path):
    from agent.store import OutboxRecord

    def record(kind, i):
        return OutboxRecord(kind, f"{kind}-{i}", "m1", float(i), "x" * 2000, float(i))

    with Store.open(tmp_path / "cap.db") as store:
        store.write([], [], [record("summary", i) for i in range(400)] + [record("event", i) for i in range(200)])
        store.mark_synced([f"summary-{i}" for i in range(100)])
        for chunk in range(20):
            store.write([reading(ts=float(i)) for i in range(chunk * 500, chunk * 500 + 500)], [])
        full = store.used_bytes()
        cap = full * 2 // 3
        dropped = store.enforce_cap(cap)
        assert store.used_bytes() <= cap
        assert set(dropped) == {"readings"} and store.counters().dropped["readings"] == dropped["readings"]
        assert len(store.outbox(pending=False)) == 500  # the synced ones went first
        oldest = store.history("m1", 0, 10**6)[0].ts
        assert oldest == float(dropped["readings"])  # the oldest readings went

        store.enforce_cap(200 * 2000 + 150 * 2000)  # room for the events and some summaries only
        assert len(store.outbox("event")) == 200  # never dropped
        assert store.counters().dropped["summaries"] > 0 and store.history("m1", 0, 10) == []


def test_the_backlog_counts_what_central_has_not_accepted_and_dates_it_by_the_first_written(tmp_path):
    from agent.store import OutboxRecord

    def record(kind: str, i: int) -> OutboxRecord:
        return OutboxRecord(kind, f"{kind}-{i}", "m1", float(i), "{}", 1000.0 + i)

    with Store.open(tmp_path / "backlog.db") as store:
        assert store.outbox_backlog() == (0, None)
        store.write([], [], [record("summary", i) for i in range(5)] + [record("event", i) for i in range(5, 8)])
        assert store.outbox_backlog() == (8, 1000.0)
        store.mark_synced([f"summary-{i}" for i in range(5)])
        assert store.outbox_backlog() == (3, 1005.0)  # the events' first, now that no summary waits
        store.write([], [], [record("summary", 9)])
        assert store.outbox_backlog() == (4, 1005.0)
        store.mark_synced(["event-5", "event-6", "event-7"])
        assert store.outbox_backlog() == (1, 1009.0)
