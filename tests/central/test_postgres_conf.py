"""The PostgreSQL settings DEPLOYMENT.md gives for fleet scale (deploy/postgresql/pdm-central.conf): a server of any
build (here the embedded one, which has no lz4) starts with them, durability stays on, and central migrates and
ingests on it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from central import auth, db
from testkit import batches
from testkit.postgres import ThrowawayPostgres, create_database
from tests.central.support import bearer

CONF = Path(__file__).resolve().parents[2] / "deploy" / "postgresql" / "pdm-central.conf"


@pytest.fixture
def tuned_url():
    with ThrowawayPostgres.create(durable=True, conf=CONF) as server:
        yield server.url(create_database(server, prefix="pdm_conf"))


def test_the_fleet_scale_settings_start_a_durable_server_central_runs_on(tuned_url, make_client):
    with psycopg.connect(tuned_url) as conn:
        shown = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                 for name in ("shared_buffers", "max_wal_size", "autovacuum", "fsync", "full_page_writes",
                              "synchronous_commit")}
        db.migrate(conn)
        token = auth.add_gateway(conn, "plant-1")
    assert shown == {"shared_buffers": "4GB", "max_wal_size": "16GB", "autovacuum": "on", "fsync": "on",
                     "full_page_writes": "on", "synchronous_commit": "on"}
    client = make_client(tuned_url)
    batch = batches.batch("plant-1", summaries=[batches.summary("plant-1", "press-01", minute=0)])
    response = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["accepted"]["summaries"] == 1
