"""The hourly roll-up's trigger (migrations 0002, 0008, 0009) on direct inserts: a machine-hour of one window takes
that window's modes (numbers only), one of several windows their per-mode maxima, and a later statement merges into
the stored row by the higher risk per mode; its rows are updated on their own page (0010)."""

from __future__ import annotations

import json

import psycopg

from central import db
from tests.central.test_partitions import fresh, migrate_to, migrated  # noqa: F401 (fixtures)

INSERT = """
INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                       model_sha256, readings, rejected, out_of_distribution, health_min, health_mean, health_last,
                       p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
SELECT %(gw)s, gen_random_uuid(), m.machine, timestamptz '2027-02-05 10:00+00' + m.minute * interval '1 minute',
       timestamptz '2027-02-05 10:01+00' + m.minute * interval '1 minute', 'ai4i', '1', 'x', 1, 0, 0, 90, 90, 90,
       0.01, 0.01, 'ok', m.modes, '{}', gen_random_uuid()
FROM jsonb_to_recordset(%(rows)s::jsonb) AS m(machine text, minute integer, modes jsonb)
"""


def modes(conn: psycopg.Connection) -> dict[str, tuple[int, dict[str, float]]]:
    return {machine: (windows, risk) for machine, windows, risk in conn.execute(
        "SELECT machine_id, windows, mode_risk_max FROM summaries_hourly ORDER BY 1")}


def test_one_window_or_several_per_machine_hour_roll_up_alike(migrated):  # noqa: F811
    with psycopg.connect(migrated, autocommit=True) as conn:
        gw = conn.execute("INSERT INTO gateways (name, token_hash) VALUES ('r', sha256('r'::bytea)) "
                          "RETURNING id").fetchone()[0]
        conn.execute("SELECT pdm_ensure_partition(p, '2027-02-05 10:00+00') FROM unnest(ARRAY['summaries', "
                     "'summaries_hourly']) p")
        first = [{"machine": "one", "minute": 0, "modes": {"A": 0.2, "B": 0.4}},
                 {"machine": "text", "minute": 0, "modes": {"A": 0.3, "B": "high"}},  # a non-number is left out
                 {"machine": "two", "minute": 0, "modes": {"A": 0.2, "B": 0.4}},
                 {"machine": "two", "minute": 1, "modes": {"A": 0.5, "C": 0.1}}]
        conn.execute(INSERT, {"gw": gw, "rows": json.dumps(first)})
        assert modes(conn) == {"one": (1, {"A": 0.2, "B": 0.4}), "text": (1, {"A": 0.3}),
                               "two": (2, {"A": 0.5, "B": 0.4, "C": 0.1})}
        later = [{"machine": "one", "minute": 2, "modes": {"A": 0.1, "C": 0.7}},
                 {"machine": "text", "minute": 2, "modes": {"B": 0.6}}]
        conn.execute(INSERT, {"gw": gw, "rows": json.dumps(later)})
        assert modes(conn) == {"one": (2, {"A": 0.2, "B": 0.4, "C": 0.7}), "text": (2, {"A": 0.3, "B": 0.6}),
                               "two": (2, {"A": 0.5, "B": 0.4, "C": 0.1})}


def blocks(conn: psycopg.Connection) -> dict[str, int]:
    """The heap page of each machine's roll-up row."""
    return dict(conn.execute("SELECT machine_id, (ctid::text::point)[0]::integer FROM summaries_hourly"))


def test_a_roll_up_row_is_updated_on_its_own_page(migrated):  # noqa: F811
    """Each summary of a machine-hour updates its roll-up row: the new version stays on the row's page (a HOT
    update, no index entry written), as migration 0010's fillfactor leaves room for it."""
    modes_of = {"TWF": 0.01, "HDF": 0.002, "PWF": 0.001, "OSF": 0.003}
    with psycopg.connect(migrated, autocommit=True) as conn:
        gw = conn.execute("INSERT INTO gateways (name, token_hash) VALUES ('r', sha256('r'::bytea)) "
                          "RETURNING id").fetchone()[0]
        conn.execute("SELECT pdm_ensure_partition(p, '2027-02-05 10:00+00') FROM unnest(ARRAY['summaries', "
                     "'summaries_hourly']) p")
        fleet = [f"m-{m:03d}" for m in range(400)]  # several pages of rows
        conn.execute(INSERT, {"gw": gw, "rows": json.dumps([{"machine": m, "minute": 0, "modes": modes_of}
                                                            for m in fleet])})
        first = blocks(conn)
        assert len(set(first.values())) > 2
        for minute in range(1, 4):  # a gateway's batch a minute
            conn.execute(INSERT, {"gw": gw, "rows": json.dumps([{"machine": m, "minute": minute, "modes": modes_of}
                                                                for m in fleet])})
            assert blocks(conn) == first, f"rows moved to another page at minute {minute}"
        assert conn.execute("SELECT min(windows), max(windows) FROM summaries_hourly").fetchone() == (4, 4)


def test_migration_0010_gives_the_roll_ups_partitions_room_and_only_them(fresh, monkeypatch):  # noqa: F811
    def fillfactor(conn: psycopg.Connection, partition: str) -> list[str] | None:
        return conn.execute("SELECT reloptions FROM pg_class WHERE relname = %s", [partition]).fetchone()[0]

    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate_to(conn, 9, monkeypatch)
        conn.execute("SELECT pdm_ensure_partition(parent, '2027-02-05 10:00+00') FROM pdm_partitioned")
        assert fillfactor(conn, "summaries_hourly_p202702") is None
        assert min(m.version for m in db.migrate(conn)) == 10
        assert fillfactor(conn, "summaries_hourly_p202702") == ["fillfactor=50"]  # existing partitions altered
        conn.execute("SELECT pdm_ensure_partition(parent, '2027-03-05 10:00+00') FROM pdm_partitioned")
        assert fillfactor(conn, "summaries_hourly_p202703") == ["fillfactor=50"]  # new ones created so
        assert [fillfactor(conn, p) for p in ("summaries_p20270305", "events_p202703")] == [None, None]
