"""/healthz, /readyz, and 503 when PostgreSQL is down, unreachable or not migrated; recovery when it is back."""

from __future__ import annotations

import time

import psycopg
import pytest

from central import auth, db
from testkit import batches
from testkit.net import free_port, wait_until
from testkit.postgres import create_database, drop_database
from tests.central.support import OPS, bearer

INGEST = "/api/v1/ingest"


def assert_unavailable(response, code: str = "database_unavailable") -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == code
    assert response.headers["retry-after"] == "5"


def test_ready_when_the_database_answers(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "schema_version": db.latest_version()}


def test_503_when_the_database_cannot_be_reached(make_client, gateway):
    name, token = gateway
    client = make_client(url=f"postgresql://postgres@127.0.0.1:{free_port()}/pdm", db_timeout_s=0.5)
    assert client.get("/healthz").status_code == 200  # the process itself is fine
    started = time.monotonic()
    assert_unavailable(client.get("/readyz"))
    assert_unavailable(client.post(INGEST, json=batches.batch(name), headers=bearer(token)))
    assert_unavailable(client.get("/api/v1/fleet", headers=OPS))
    assert time.monotonic() - started < 10  # each waited about db_timeout_s, not a TCP timeout
    # Authentication never needs the database for a request without a token.
    assert client.post(INGEST, json=batches.batch(name)).status_code == 401


def wait_ready(client, timeout: float = 30.0) -> None:
    assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout, interval=0.2), \
        "not ready again within 30 s"


@pytest.mark.parametrize("mode", ["fast", "immediate"], ids=["shutdown", "crash"])
def test_503_while_postgres_is_stopped_then_service_resumes(make_client, private_postgres, mode):
    url = private_postgres.url(create_database(private_postgres, prefix="pdm_outage"))
    with psycopg.connect(url, autocommit=True) as conn:
        db.migrate(conn)
        token = auth.add_gateway(conn, "gw-outage")
    client = make_client(url=url, db_timeout_s=1.0)
    first = batches.batch("gw-outage", summaries=[batches.summary("gw-outage", minute=0)], events=[])
    assert client.post(INGEST, json=first, headers=bearer(token)).status_code == 200

    private_postgres.stop(mode)
    assert_unavailable(client.get("/readyz"))
    during = batches.batch("gw-outage", summaries=[batches.summary("gw-outage", minute=1)], events=[])
    assert_unavailable(client.post(INGEST, json=during, headers=bearer(token)))

    private_postgres.start()
    wait_ready(client)
    response = client.post(INGEST, json=during, headers=bearer(token))  # the agent's retry
    assert response.status_code == 200, response.text
    assert response.json()["accepted"]["summaries"] == 1
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM summaries").fetchone()[0] == 2


def test_a_restart_between_two_requests_fails_no_request(make_client, private_postgres):
    """The pool's connections died with the server: each is checked before use, so none is handed out dead."""
    url = private_postgres.url(create_database(private_postgres, prefix="pdm_restart"))
    with psycopg.connect(url, autocommit=True) as conn:
        db.migrate(conn)
    client = make_client(url=url, db_timeout_s=5.0, pool_min_size=2)
    assert client.get("/api/v1/fleet", headers=OPS).status_code == 200
    private_postgres.stop("immediate")
    private_postgres.start()
    response = client.get("/api/v1/fleet", headers=OPS)
    assert response.status_code == 200, response.text


def test_readyz_answers_within_a_probes_timeout(make_client):
    client = make_client(url=f"postgresql://postgres@127.0.0.1:{free_port()}/pdm", db_timeout_s=30.0)
    started = time.monotonic()
    assert_unavailable(client.get("/readyz"))
    assert time.monotonic() - started < 2.5


def test_503_until_the_schema_is_migrated(make_client, postgres, gateway):
    name = create_database(postgres, prefix="pdm_unmigrated")
    try:
        url = postgres.url(name)
        client = make_client(url=url)
        assert_unavailable(client.get("/readyz"), "schema_outdated")
        assert "pdm-central migrate" in client.get("/readyz").json()["error"]["message"]
        assert_unavailable(client.post(INGEST, json=batches.batch("gw-1"), headers=bearer("pdmgw_x")),
                           "schema_outdated")
        with psycopg.connect(url, autocommit=True) as conn:
            db.migrate(conn)
        assert client.get("/readyz").status_code == 200
    finally:
        drop_database(postgres, name)
