"""Time partitions (migration 0006, central/partitions.py): an old database moved without losing a row, partitions
created ahead and on demand, retention by dropping whole partitions. Each test on a database of its own: retention
would otherwise drop the shared database's old days under other tests."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from central import db, partitions
from central.partitions import Retention
from testkit import batches
from testkit.postgres import create_database, drop_database
from tests.central.support import OPS, bearer

NOW = datetime(2027, 3, 15, 10, 30, tzinfo=UTC)  # the fake clock of the retention tests


@pytest.fixture
def fresh(postgres):
    name = create_database(postgres, prefix="pdm_partitions")
    yield postgres.url(name)
    drop_database(postgres, name)


@pytest.fixture
def migrated(fresh):
    with psycopg.connect(fresh) as conn:
        db.migrate(conn)
    return fresh


def migrate_to(conn: psycopg.Connection, version: int, monkeypatch) -> None:
    shipped = db.migrations()
    with monkeypatch.context() as patch:
        patch.setattr(db, "migrations", lambda: tuple(m for m in shipped if m.version <= version))
        db.migrate(conn)


# A filled database of the old layout (migrations 0001-0004): 3 gateways, 4 machines each, a window every 10
# minutes over 3 days around a month's end, an event every 6 hours over 40 days.
FILL = """
INSERT INTO gateways (name, token_hash) SELECT 'old-' || g, sha256(('token' || g)::bytea) FROM generate_series(1, 3) g;
INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                       model_sha256, readings, rejected, out_of_distribution, health_min, health_mean, health_last,
                       p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
SELECT g.id, gen_random_uuid(), 'm' || m, t, t + interval '10 minutes', 'ai4i', '1', repeat('a', 64), 60, 0, 0,
       90 - m, 95, 94, 0.01 * m, 0.005, (ARRAY['ok', 'warning', 'alarm'])[1 + (extract(hour FROM t)::int % 3)],
       jsonb_build_object('TWF', 0.01 * m), jsonb_build_object('torque', jsonb_build_object('mean', 40 + m)),
       gen_random_uuid()
FROM gateways g, generate_series(1, 4) m,
     generate_series(timestamptz '2026-01-30 00:00+00', timestamptz '2026-02-01 23:50+00', interval '10 minutes') t;
INSERT INTO events (gateway_id, event_id, machine_id, ts, from_state, to_state, p_failure, health, dominant_mode,
                    mode_risk, reading, model_name, model_version, model_sha256, batch_id)
SELECT g.id, gen_random_uuid(), 'm1', t, 'ok', 'warning', 0.3, 60, 'TWF', '{"TWF": 0.3}', '{"torque": 50}',
       'ai4i', '1', repeat('a', 64), gen_random_uuid()
FROM gateways g, generate_series(timestamptz '2026-01-10 00:00+00', timestamptz '2026-02-18 00:00+00',
                                 interval '6 hours') t;
"""
SNAPSHOT = {
    "summaries": "SELECT md5(string_agg(t::text, '|' ORDER BY gateway_id, summary_id)), count(*) FROM summaries t",
    "events": "SELECT md5(string_agg(t::text, '|' ORDER BY gateway_id, event_id)), count(*) FROM events t",
    "summaries_hourly": "SELECT md5(string_agg(t::text, '|' ORDER BY gateway_id, machine_id, hour)), count(*) "
                        "FROM summaries_hourly t",
}


def snapshot(conn: psycopg.Connection) -> dict:
    return {table: conn.execute(query).fetchone() for table, query in SNAPSHOT.items()}


def partition_names(conn: psycopg.Connection, parent: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = %s::regclass ORDER BY 1", [parent])]


def test_an_old_database_moves_onto_partitions_without_losing_a_row(fresh, monkeypatch, make_client):
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate_to(conn, 4, monkeypatch)
        conn.execute(FILL)
        before = snapshot(conn)
        assert before["summaries"][1] == 3 * 4 * 432 and before["events"][1] == 3 * 157
        assert before["summaries_hourly"][1] == 3 * 4 * 72  # kept by 0002's trigger

        applied = db.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in db.migrations() if m.version > 4]
        assert "partitions" in [m.name for m in applied]
        assert snapshot(conn) == before  # every row, every value; the roll-up not counted twice

        kinds = dict(conn.execute("SELECT relname, relkind FROM pg_class WHERE relname IN "
                                  "('summaries', 'events', 'summaries_hourly')").fetchall())
        assert kinds == {"summaries": "p", "events": "p", "summaries_hourly": "p"}
        assert partition_names(conn, "summaries") == ["summaries_p20260130", "summaries_p20260131",
                                                      "summaries_p20260201"]
        assert partition_names(conn, "events") == ["events_p202601", "events_p202602"]
        assert partition_names(conn, "summaries_hourly") == ["summaries_hourly_p202601", "summaries_hourly_p202602"]
        # The indexes exist on every partition, and a machine's range reads only its days' partitions.
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = "
                                              "'summaries_p20260131'")}
        assert len(indexes) == 2  # the primary key and summaries_machine_chart (0009 dropped summaries_not_ok)
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT * FROM summaries WHERE gateway_id = 1 AND machine_id = 'm1' "
            "AND window_start >= '2026-01-31T00:00Z' AND window_start < '2026-01-31T12:00Z'"))
        assert "summaries_p20260131" in plan and "summaries_p20260130" not in plan

    # The API on the moved database: a resend is a duplicate, a new summary is stored and rolled up.
    name = "old-1"
    token = "token-new"
    with psycopg.connect(fresh, autocommit=True) as conn:
        conn.execute("UPDATE gateways SET token_hash = sha256(%s::bytea) WHERE name = %s", [token.encode(), name])
    client = make_client(fresh)
    t0 = datetime(2026, 2, 1, 23, 0, tzinfo=UTC)
    batch = batches.batch(name, summaries=[batches.summary(name, "m9", minute=m, t0=t0) for m in range(3)])
    first = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    again = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert first.json()["accepted"]["summaries"] == 3, first.text
    assert again.json()["duplicates"]["summaries"] == 3
    with psycopg.connect(fresh) as conn:
        assert conn.execute("SELECT windows FROM summaries_hourly WHERE machine_id = 'm9'").fetchone()[0] == 3


def test_ingest_creates_the_partition_of_a_day_it_has_not_seen(migrated, make_client):
    """A gateway back from a long outage sends days no partition was made ahead for: stored, not refused."""
    from tests.central.conftest import Gateways

    name, token = Gateways(migrated).add()
    client = make_client(migrated)
    long_ago = datetime(2025, 7, 4, 12, 0, tzinfo=UTC)
    batch = batches.batch(name, summaries=[batches.summary(name, "m1", minute=0, t0=long_ago)],
                          events=[batches.event(name, "m1", minute=0, t0=long_ago)])
    response = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == {"summaries": 1, "events": 1}
    with psycopg.connect(migrated) as conn:
        assert "summaries_p20250704" in partition_names(conn, "summaries")
        assert "events_p202507" in partition_names(conn, "events")
        assert "summaries_hourly_p202507" in partition_names(conn, "summaries_hourly")


def test_a_partition_dropped_under_a_running_api_is_made_again_at_the_retry(migrated, make_client):
    from tests.central.conftest import Gateways

    name, token = Gateways(migrated).add()
    client = make_client(migrated)
    day = datetime(2025, 9, 1, 8, 0, tzinfo=UTC)

    def send(minute: int):
        return client.post("/api/v1/ingest", headers=bearer(token),
                           json=batches.batch(name, summaries=[batches.summary(name, "m1", minute, t0=day)]))

    assert send(0).status_code == 200
    with psycopg.connect(migrated, autocommit=True) as conn:  # retention, run by another process
        conn.execute("ALTER TABLE summaries DETACH PARTITION summaries_p20250901 CONCURRENTLY")
        conn.execute("DROP TABLE summaries_p20250901")
    refused = send(1)
    assert refused.status_code == 503  # the agent retries 5xx; a 422 would make it set the summary aside
    assert refused.json()["error"]["code"] == "database_unavailable"
    assert send(1).status_code == 200


async def _round(url: str, now: datetime, retention: Retention, ahead: int = 7):
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await partitions.run_round(conn, now, retention, ahead)


def test_partitions_are_created_ahead(migrated):
    report = asyncio.run(_round(migrated, NOW, Retention(), ahead=7))
    assert [n for n in report.created if n.startswith("summaries_p")] == [
        f"summaries_p{(NOW + timedelta(days=d)):%Y%m%d}" for d in range(8)]
    assert {n for n in report.created if not n.startswith("summaries_p")} == {"events_p202703",
                                                                             "summaries_hourly_p202703"}
    again = asyncio.run(_round(migrated, NOW, Retention(), ahead=7))
    assert again.created == [] and again.dropped == []


def fill_days(conn: psycopg.Connection, gateway_id: int, first: datetime, days: int) -> None:
    """One summary an hour on each day, through the roll-up trigger (as ingest writes)."""
    conn.execute("""
        INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                               model_sha256, readings, rejected, out_of_distribution, health_min, health_mean,
                               health_last, p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
        SELECT %(gw)s, gen_random_uuid(), 'm1', t, t + interval '1 minute', 'ai4i', '1', 'x', 1, 0, 0, 90, 90, 90,
               0.01, 0.01, 'ok', '{}', '{}', gen_random_uuid()
        FROM generate_series(%(first)s::timestamptz, %(first)s::timestamptz + %(days)s * interval '1 day'
                             - interval '1 hour', interval '1 hour') t""",
                 {"gw": gateway_id, "first": first, "days": days})


def test_retention_drops_whole_partitions_past_their_period(migrated):
    with psycopg.connect(migrated, autocommit=True) as conn:
        gateway_id = conn.execute("INSERT INTO gateways (name, token_hash) VALUES ('r', sha256('r'::bytea)) "
                                  "RETURNING id").fetchone()[0]
        first = datetime(2027, 2, 5, tzinfo=UTC)  # 5 Feb .. 14 Mar: 38 days
        for day in range(38):
            conn.execute("SELECT pdm_ensure_partition('summaries', %s)", [first + timedelta(days=day)])
            conn.execute("SELECT pdm_ensure_partition('summaries_hourly', %s)", [first + timedelta(days=day)])
        fill_days(conn, gateway_id, first, 38)
        hourly_before = conn.execute("SELECT count(*), sum(windows) FROM summaries_hourly").fetchone()

    report = asyncio.run(_round(migrated, NOW, Retention(summaries=30)))

    # 30 days before 15 Mar 10:30 is 13 Feb 10:30: the days ending by then (5-12 Feb) are gone, 13 Feb is kept whole.
    assert sorted(n for n in report.dropped if n.startswith("summaries_p")) == [
        f"summaries_p202702{d:02d}" for d in range(5, 13)]
    with psycopg.connect(migrated) as conn:
        days = [r[0] for r in conn.execute("SELECT DISTINCT date_trunc('day', window_start, 'UTC')::date "
                                           "FROM summaries ORDER BY 1")]
        assert days[0].isoformat() == "2027-02-13" and len(days) == 30
        assert conn.execute("SELECT count(*) FROM summaries").fetchone()[0] == 30 * 24  # no row of a kept day lost
        # The roll-up keeps the dropped days (its own retention is years): the dashboard's long ranges still draw.
        assert conn.execute("SELECT count(*), sum(windows) FROM summaries_hourly").fetchone() == hourly_before
        assert not any(n.startswith("summaries_hourly") for n in report.dropped)

    # Years later the roll-up's months go too, by its own retention.
    later = asyncio.run(_round(migrated, datetime(2032, 6, 1, tzinfo=UTC), Retention(summaries=30, rollup=1830)))
    assert {"summaries_hourly_p202702", "summaries_hourly_p202703"} <= set(later.dropped)


def test_a_half_done_detach_is_finished_by_the_next_round(migrated):
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("SELECT pdm_ensure_partition('summaries', '2026-01-01T00:00Z')")
        # What a lost connection in the middle of DETACH CONCURRENTLY leaves: the partition marked detach-pending.
        conn.execute("UPDATE pg_inherits SET inhdetachpending = true WHERE inhrelid = 'summaries_p20260101'::regclass")
    report = asyncio.run(_round(migrated, NOW, Retention()))
    assert "summaries_p20260101" in report.dropped
    with psycopg.connect(migrated) as conn:
        assert conn.execute("SELECT to_regclass('summaries_p20260101')").fetchone()[0] is None


def test_closed_episodes_past_their_period_go_with_their_audit_log(migrated):
    with psycopg.connect(migrated, autocommit=True) as conn:
        gw = conn.execute("INSERT INTO gateways (name, token_hash) VALUES ('e', sha256('e'::bytea)) "
                          "RETURNING id").fetchone()[0]

        def episode(opened: str, closed: str | None, merged_into: int | None = None) -> int:
            return conn.execute(
                "INSERT INTO alarm_episodes (gateway_id, machine_id, opened_at, closed_at, state, peak_state, "
                "dominant_mode, p_failure_max, events, noticed_at, merged_into) VALUES "
                "(%s, 'm1', %s, %s, 'alarm', 'alarm', 'TWF', 0.9, 2, %s, %s) RETURNING id",
                [gw, opened, closed, opened, merged_into]).fetchone()[0]

        old = episode("2024-01-01T00:00Z", "2024-01-02T00:00Z")
        merged = episode("2024-01-01T12:00Z", "2024-01-01T13:00Z", merged_into=old)
        recent = episode("2027-01-01T00:00Z", "2027-01-02T00:00Z")
        still_open = episode("2023-01-01T00:00Z", None)
        conn.execute("INSERT INTO alarm_actions (episode_id, actor, action, detail) VALUES (%s, 'ops token', "
                     "'comment', '{}')", [old])
    report = asyncio.run(_round(migrated, NOW, Retention(episodes=730)))
    assert report.episodes_deleted == 2
    with psycopg.connect(migrated) as conn:
        left = {r[0] for r in conn.execute("SELECT id FROM alarm_episodes")}
        assert left == {recent, still_open} and merged not in left
        assert conn.execute("SELECT count(*) FROM alarm_actions").fetchone()[0] == 0


def test_the_maintenance_lock_lets_one_process_run_a_round_at_a_time(migrated):
    async def both():
        async with await psycopg.AsyncConnection.connect(migrated, autocommit=True) as holder:
            await holder.execute("SELECT pg_advisory_lock(%s)", [partitions.MAINTENANCE_LOCK])
            return await _round(migrated, NOW, Retention())

    assert asyncio.run(both()) is None


def test_the_fleet_endpoint_still_answers_on_partitions(migrated, make_client):
    """Smoke: the ops API's reads run on the partitioned tables."""
    assert make_client(migrated).get("/api/v1/fleet", headers=OPS).status_code == 200


def test_the_chart_of_days_past_the_raw_retention_is_drawn_from_the_roll_up(migrated, make_client):
    from tests.central.conftest import Gateways

    name, token = Gateways(migrated).add()
    client = make_client(migrated, retain_summaries_days=30)
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    old, recent = now - timedelta(days=40), now - timedelta(days=2)
    summaries = [batches.summary(name, "m1", minute=m, t0=t0) for t0 in (old, recent) for m in range(120)]
    assert client.post("/api/v1/ingest", json=batches.batch(name, summaries=summaries),
                       headers=bearer(token)).status_code == 200
    with psycopg.connect(migrated, autocommit=True) as conn:  # retention has run: the raw day is gone
        part = conn.execute("SELECT pdm_ensure_partition('summaries', %s)", [old]).fetchone()[0]
        conn.execute(f"ALTER TABLE summaries DETACH PARTITION {part} CONCURRENTLY")
        conn.execute(f"DROP TABLE {part}")

    def chart(t0):
        response = client.get(f"/api/v1/dashboard/gateways/{name}/machines/m1", headers=OPS, params={
            "since": t0.isoformat(), "until": (t0 + timedelta(hours=2)).isoformat(), "points": 120})
        assert response.status_code == 200, response.text
        return response.json()

    recent_chart, old_chart = chart(recent), chart(old)
    assert recent_chart["range"]["bucket_s"] == 60 and len(recent_chart["series"]) == 120  # raw, minute by minute
    assert old_chart["range"]["bucket_s"] == 3600  # the roll-up's hours: the two hours are still drawn
    assert [b["windows"] for b in old_chart["series"]] == [60, 60]
