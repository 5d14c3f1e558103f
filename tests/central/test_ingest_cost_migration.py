"""Migration 0008 (ingest's cost, issue 21) on a database filled through 0001-0007: the machines keep their dominant
mode (no longer a generated column: ingest writes it), and the hourly roll-up goes on from the rows it holds."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from central import db
from testkit import batches
from testkit.postgres import create_database, drop_database
from tests.central.support import bearer
from tests.central.test_partitions import migrate_to

T0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)  # as OLD's literal
OLD = """
SELECT pdm_ensure_partition(parent, timestamptz '2026-05-04 08:00+00') FROM pdm_partitioned;
INSERT INTO gateways (name, token_hash) VALUES ('old-1', sha256('token-old'::bytea));
INSERT INTO machines (gateway_id, machine_id, summary_id, window_start, window_end, worst_state, health_last,
                      p_failure_max, mode_risk_max, model_name, model_version)
SELECT g.id, 'm' || m, gen_random_uuid(), timestamptz '2026-05-04 08:00+00', timestamptz '2026-05-04 08:00+00' + interval '1 minute', 'ok', 90, 0.1,
       CASE m WHEN 1 THEN '{"TWF": 0.2, "HDF": 0.5}' WHEN 2 THEN '{"OSF": 0.3, "PWF": 0.3}' ELSE '{}' END::jsonb,
       'ai4i', '1'
FROM gateways g, generate_series(1, 3) m;
INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                       model_sha256, readings, rejected, out_of_distribution, health_min, health_mean, health_last,
                       p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
SELECT g.id, gen_random_uuid(), 'm1', timestamptz '2026-05-04 08:00+00' + w * interval '1 minute', timestamptz '2026-05-04 08:00+00' + (w + 1) * interval '1 minute',
       'ai4i', '1', repeat('a', 64), 60, 0, 0, 80, 90, 90, 0.5, 0.2, 'ok', '{"TWF": 0.2, "HDF": 0.5}', '{}',
       gen_random_uuid()
FROM gateways g, generate_series(0, 1) w;
"""


@pytest.fixture
def fresh(postgres):
    name = create_database(postgres, prefix="pdm_0008")
    yield postgres.url(name)
    drop_database(postgres, name)


def test_machines_and_the_roll_up_carry_on_across_0008(fresh, monkeypatch, make_client):
    with psycopg.connect(fresh, autocommit=True) as conn:
        migrate_to(conn, 7, monkeypatch)
        conn.execute(OLD)
        modes_before = conn.execute("SELECT machine_id, dominant_mode FROM machines ORDER BY 1").fetchall()
        assert modes_before == [("m1", "HDF"), ("m2", "OSF"), ("m3", None)]  # the generated column's values
        assert min(m.version for m in db.migrate(conn)) == 8  # 0008, then the later ones
        assert conn.execute("SELECT machine_id, dominant_mode FROM machines ORDER BY 1").fetchall() == modes_before

    client = make_client(fresh)
    later = batches.summary("old-1", "m1", minute=2, t0=T0, mode_risk_max={"TWF": 0.9, "HDF": 0.1, "OSF": 0.05})
    new = batches.summary("old-1", "m4", minute=2, t0=T0, mode_risk_max={"PWF": 0.25, "HDF": 0.25})
    response = client.post("/api/v1/ingest", json=batches.batch("old-1", summaries=[later, new], events=[]),
                           headers=bearer("token-old"))
    assert response.json()["accepted"]["summaries"] == 2, response.text
    with psycopg.connect(fresh) as conn:
        modes = conn.execute("SELECT machine_id, dominant_mode FROM machines ORDER BY 1").fetchall()
        assert modes == [("m1", "TWF"), ("m2", "OSF"), ("m3", None), ("m4", "HDF")]  # a tie goes to the first name
        hours = conn.execute("SELECT machine_id, windows, mode_risk_max FROM summaries_hourly ORDER BY 1").fetchall()
        # m1's hour: two windows from before the migration, one after; each mode's highest risk of the three.
        assert hours == [("m1", 3, {"TWF": 0.9, "HDF": 0.5, "OSF": 0.05}), ("m4", 1, {"PWF": 0.25, "HDF": 0.25})]
