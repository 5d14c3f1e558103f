"""A read replica (PDM_CENTRAL_READ_DATABASE_URL, central/replica.py): a real streaming replica on loopback (initdb,
pg_basebackup -R, a second postmaster), the dashboard and ops reads served by it, its lag shown, ingest and sessions
on the primary, and the primary standing in when the replica stops."""

from __future__ import annotations

import logging
import time

import psycopg
import pytest
from pydantic import SecretStr

from central import auth, db
from testkit import batches
from testkit.postgres import ThrowawayPostgres, create_database
from tests.central.support import OPS, bearer


@pytest.fixture
def servers():
    """(primary URL, replica URL, the replica's server): a migrated database streamed to a replica."""
    primary = ThrowawayPostgres.create()
    try:
        name = create_database(primary, prefix="pdm_replica")
        with psycopg.connect(primary.url(name)) as conn:
            db.migrate(conn)
        replica = primary.standby()
        try:
            yield primary.url(name), replica.url(name), replica
        finally:
            replica.close()
    finally:
        primary.close()


def wait_for(condition, timeout: float = 30.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout:g} s")


def fleet(client, gateway: str) -> dict:
    response = client.get("/api/v1/dashboard/fleet", params={"gateway": gateway}, headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()


def machines(client, gateway: str) -> set[str]:
    return {m["machine_id"] for m in fleet(client, gateway)["machines"]}


def send(client, name: str, token: str, machine: str) -> None:
    batch = batches.batch(name, summaries=[batches.summary(name, machine, minute=0)])
    response = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert response.status_code == 200, response.text  # the replica is read-only: ingest went to the primary


def test_the_dashboard_reads_from_the_replica_and_shows_its_lag(servers, make_client):
    primary_url, replica_url, _ = servers
    with psycopg.connect(primary_url) as conn:
        token = auth.add_gateway(conn, "plant-1")
    client = make_client(primary_url, read_database_url=SecretStr(replica_url))

    send(client, "plant-1", token, "press-01")
    wait_for(lambda: "press-01" in machines(client, "plant-1"), what="press-01 replayed on the replica")
    reads = fleet(client, "plant-1")["reads"]
    assert reads["from"] == "replica" and reads["replica"]["state"] == "streaming"
    assert reads["replica"]["lag_s"] >= 0

    # Replay paused on the replica: a machine stored on the primary is not seen yet, and the lag grows.
    with psycopg.connect(replica_url, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        send(client, "plant-1", token, "press-02")
        wait_for(lambda: fleet(client, "plant-1")["reads"]["replica"]["lag_s"] > 0, what="the replica to fall behind")
        assert machines(client, "plant-1") == {"press-01"}
        ops = client.get("/api/v1/machines", params={"gateway": "plant-1"}, headers=OPS).json()  # ops reads too
        assert [m["machine_id"] for m in ops["machines"]] == ["press-01"]
        assert fleet(client, "plant-1")["reads"]["replica"]["lag_s"] > 0
        # Sessions are written and checked on the primary: signing in works while the replica is behind.
        signed_in = client.post("/login", data={"token": OPS["Authorization"].split()[1]},
                                headers={"Origin": "http://testserver"}, follow_redirects=False)
        assert signed_in.status_code == 303, signed_in.text
        conn.execute("SELECT pg_wal_replay_resume()")
    wait_for(lambda: "press-02" in machines(client, "plant-1"), what="press-02 replayed after resume")
    wait_for(lambda: fleet(client, "plant-1")["reads"]["replica"]["lag_s"] == 0, what="the lag back to 0")


def test_the_primary_stands_in_while_the_replica_is_down(servers, make_client, caplog, monkeypatch):
    from central import replica as replica_module

    primary_url, replica_url, replica = servers
    monkeypatch.setattr(replica_module, "RETRY_S", 0.5)
    with psycopg.connect(primary_url) as conn:
        token = auth.add_gateway(conn, "plant-2")
    client = make_client(primary_url, read_database_url=SecretStr(replica_url))
    send(client, "plant-2", token, "press-01")
    wait_for(lambda: "press-01" in machines(client, "plant-2"), what="press-01 on the replica")

    caplog.set_level(logging.INFO, logger="central.replica")
    replica.stop()
    # The request that finds the replica gone may fail (503, its connection died under it); the next are served.
    client.get("/api/v1/dashboard/fleet", headers=OPS)
    data = wait_for(lambda: (r := client.get("/api/v1/dashboard/fleet", params={"gateway": "plant-2"},
                                             headers=OPS)).status_code == 200 and r.json(),
                    what="the fleet view served by the primary")
    assert data["reads"]["from"] == "primary" and data["reads"]["replica"]["state"] == "down"
    send(client, "plant-2", token, "press-02")  # written and, with the replica down, read on the primary at once
    assert machines(client, "plant-2") == {"press-01", "press-02"}
    assert client.get("/api/v1/events", headers=OPS).status_code == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "read replica unavailable" in r.message]
    assert len(warnings) == 1  # once when it went down, not once per request

    replica.start()
    wait_for(lambda: fleet(client, "plant-2")["reads"]["from"] == "replica", what="reads back on the replica")
    assert any("read replica back" in r.message for r in caplog.records)
