"""The schema and its migrations, on fresh databases of the session's PostgreSQL."""

from __future__ import annotations

import threading

import psycopg
import pytest

from central import db
from testkit.postgres import create_database, drop_database

TABLES = {"schema_migrations", "gateways", "summaries", "events", "machines", "dashboard_sessions",
          "summaries_hourly", "machine_states", "summary_conflicts",
          "alarm_episodes", "alarm_actions", "notify_outbox", "pdm_partitioned",
          "gateway_desired", "model_bundles", "rollouts", "shadow_figures"}


@pytest.fixture
def fresh(postgres):
    """The URL of a new, empty database, dropped after the test."""
    name = create_database(postgres, prefix="pdm_migrate")
    yield postgres.url(name)
    drop_database(postgres, name)


def tables(conn) -> set[str]:
    return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_migrations_are_numbered_once_in_order_from_0001():
    versions = [m.version for m in db.migrations()]
    assert versions[0] == 1
    assert versions == sorted(set(versions))
    assert db.latest_version() == versions[-1]


def test_migrate_creates_the_schema_then_does_nothing(fresh):
    with psycopg.connect(fresh) as conn:
        assert db.schema_version(conn) == 0
        applied = db.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in db.migrations()]
        assert tables(conn) == TABLES
        assert db.schema_version(conn) == db.latest_version()
        recorded = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version").fetchall()
        assert recorded == [(m.version, m.checksum) for m in db.migrations()]

        assert db.migrate(conn) == []
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(db.migrations())


def test_concurrent_migrations_apply_each_migration_once(fresh):
    results, errors = [], []

    def run():
        try:
            with psycopg.connect(fresh) as conn:
                results.append(len(db.migrate(conn)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [0, 0, len(db.migrations())]


def test_a_migration_changed_after_it_was_applied_is_refused(fresh):
    with psycopg.connect(fresh) as conn:
        db.migrate(conn)
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        conn.commit()
        with pytest.raises(db.MigrationError, match="0001_initial.sql changed after it was applied"):
            db.migrate(conn)


def test_a_database_newer_than_the_code_is_refused(fresh):
    with psycopg.connect(fresh) as conn:
        db.migrate(conn)
        conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, 'future', 'x')",
                     [db.latest_version() + 1])
        conn.commit()
        with pytest.raises(db.MigrationError, match="newer than this pdm-central"):
            db.migrate(conn)


def test_a_failing_migration_leaves_nothing_behind(fresh, monkeypatch):
    broken = db.Migration(db.latest_version() + 1, "broken", "CREATE TABLE half_done (x int); SELECT 1/0;")
    shipped = db.migrations()
    monkeypatch.setattr(db, "migrations", lambda: (*shipped, broken))
    with psycopg.connect(fresh) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            db.migrate(conn)
        conn.rollback()
        assert tables(conn) == set()  # the whole run is one transaction: not even 0001 stayed


def test_stored_ids_are_scoped_by_gateway(central_url):
    """Ids are UUIDv5 of public names: another gateway could compute them. They must not collide across gateways."""
    with psycopg.connect(central_url) as conn:
        keys = conn.execute("""
            SELECT c.conrelid::regclass::text, array_agg(a.attname ORDER BY array_position(c.conkey, a.attnum))
            FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)
            WHERE c.contype = 'p' AND c.conrelid::regclass::text IN ('summaries', 'events')
            GROUP BY 1""").fetchall()
    # The partition key (the time) ends each key (migration 0006); the gateway leads it.
    assert dict(keys) == {"summaries": ["gateway_id", "summary_id", "window_start"],
                          "events": ["gateway_id", "event_id", "ts"]}
