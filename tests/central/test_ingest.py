"""`POST /api/v1/ingest`: what is stored, once, and what is counted as a duplicate."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid

import psycopg
import pytest

from central import db, ingest, partitions
from central.auth import Gateway, token_hash
from sync.protocol import IngestBatch, IngestResult
from testkit import batches
from testkit.batches import event, summary
from tests.central.support import bearer, make_settings

INGEST = "/api/v1/ingest"


def counts(conn, name: str) -> tuple[int, int]:
    return conn.execute("""
        SELECT (SELECT count(*) FROM summaries s WHERE s.gateway_id = g.id),
               (SELECT count(*) FROM events e WHERE e.gateway_id = g.id)
        FROM gateways g WHERE g.name = %s""", [name]).fetchone()


def result(accepted=(0, 0), duplicates=(0, 0)) -> dict:
    return {"accepted": {"summaries": accepted[0], "events": accepted[1]},
            "duplicates": {"summaries": duplicates[0], "events": duplicates[1]}}


def test_the_test_batches_follow_the_protocol():
    IngestBatch.model_validate_json(json.dumps(batches.batch("gw-1", events=[event("gw-1"), event("gw-1", minute=2)])))


def test_a_batch_is_stored_and_a_resent_batch_counts_duplicates(client, gateway, conn):
    name, token = gateway
    batch = batches.batch(name, events=[event(name), event(name, minute=1, from_state="warning", to_state="alarm")])
    response = client.post(INGEST, json=batch, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == result(accepted=(3, 2))
    IngestResult.model_validate_json(response.content)
    assert counts(conn, name) == (3, 2)

    again = client.post(INGEST, json={**batch, "batch_id": str(uuid.uuid4())}, headers=bearer(token))
    assert again.status_code == 200
    assert again.json() == result(duplicates=(3, 2))
    assert counts(conn, name) == (3, 2)

    # Half old, half new: only the new ones are stored.
    mixed = batches.batch(name, summaries=[summary(name, minute=m) for m in range(2, 6)], events=[])
    assert client.post(INGEST, json=mixed, headers=bearer(token)).json() == result(accepted=(3, 0),
                                                                                  duplicates=(1, 0))
    assert counts(conn, name) == (6, 2)


def test_the_same_id_twice_in_one_batch_is_stored_once(client, gateway, conn):
    name, token = gateway
    twice = batches.batch(name, summaries=[summary(name)] * 2, events=[event(name)] * 2)
    assert client.post(INGEST, json=twice, headers=bearer(token)).json() == result(accepted=(1, 1),
                                                                                  duplicates=(1, 1))
    assert counts(conn, name) == (1, 1)


def test_an_empty_batch_updates_the_gateways_status(client, gateway, conn):
    name, token = gateway
    empty = batches.batch(name, summaries=[], events=[], agent_version="0.2.0",
                          gateway={"buffer_pending": 0, "dropped_total": 7, "dropped": {"readings": 7},
                                   "uptime_s": 12.0})
    assert client.post(INGEST, json=empty, headers=bearer(token)).json() == result()
    seen, version, status, batch_id = conn.execute(
        "SELECT last_seen_at, agent_version, last_status, last_batch_id FROM gateways WHERE name = %s",
        [name]).fetchone()
    assert seen is not None and version == "0.2.0" and str(batch_id) == empty["batch_id"]
    assert status == {"buffer_pending": 0, "dropped_total": 7, "dropped": {"readings": 7}, "uptime_s": 12.0}


def test_gzip_bodies_are_accepted(client, gateway, conn):
    name, token = gateway
    body = gzip.compress(json.dumps(batches.batch(name)).encode())
    response = client.post(INGEST, content=body, headers={**bearer(token), "Content-Type": "application/json",
                                                          "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.json() == result(accepted=(3, 1))


def test_values_are_stored_as_sent(client, gateway, conn):
    name, token = gateway
    sent_summary = summary(name, "lathe_7", minute=5, state="alarm", p_failure_max=0.875,
                           inputs={"torque": {"min": -1.5e-7, "mean": 12.0, "max": 1e300}})
    sent_event = event(name, "lathe_7", minute=5, to_state="alarm", from_state="warning")
    batch = batches.batch(name, summaries=[sent_summary], events=[sent_event])
    assert client.post(INGEST, json=batch, headers=bearer(token)).status_code == 200
    row = conn.execute("""
        SELECT summary_id::text, machine_id, window_start, window_end, model_name, model_version, model_sha256,
               readings, rejected, out_of_distribution, health_min, health_mean, health_last, p_failure_max,
               p_failure_mean, worst_state, mode_risk_max, inputs, batch_id::text
        FROM summaries WHERE summary_id = %s""", [sent_summary["summary_id"]]).fetchone()
    model = sent_summary["model"]
    assert row[:2] == (sent_summary["summary_id"], "lathe_7")
    assert row[2].isoformat() == sent_summary["window_start"] and row[3].isoformat() == sent_summary["window_end"]
    assert row[4:7] == (model["name"], model["version"], model["sha256"])
    assert row[7:] == (60, 1, 2, 81.5, 90.25, 92.0, 0.875, 0.4375, "alarm", sent_summary["mode_risk_max"],
                       row[17], batch["batch_id"])
    # jsonb keeps numbers exact: 1e300 comes back as the integer 10**300, the same double once read as one.
    assert {k: float(v) for k, v in row[17]["torque"].items()} == sent_summary["inputs"]["torque"]
    stored_event = conn.execute("""
        SELECT event_id::text, ts, from_state, to_state, p_failure, health, dominant_mode, mode_risk, reading
        FROM events WHERE event_id = %s""", [sent_event["event_id"]]).fetchone()
    assert stored_event[0] == sent_event["event_id"] and stored_event[1].isoformat() == sent_event["ts"]
    assert stored_event[2:] == ("warning", "alarm", 0.41, 58.5, "OSF", sent_event["mode_risk"], sent_event["reading"])


def test_a_machines_state_follows_its_latest_window_only(client, gateway, conn):
    name, token = gateway

    def send(minute: int, state: str) -> None:
        batch = batches.batch(name, summaries=[summary(name, "m1", minute=minute, state=state)], events=[])
        assert client.post(INGEST, json=batch, headers=bearer(token)).status_code == 200

    def state() -> tuple:
        return conn.execute("SELECT m.worst_state, m.window_start FROM machines m JOIN gateways g "
                            "ON g.id = m.gateway_id WHERE g.name = %s AND machine_id = 'm1'", [name]).fetchone()

    send(10, "warning")
    assert state()[0] == "warning"
    send(5, "alarm")  # an old window sent late (e.g. after a gateway restart) does not change the present
    assert state()[0] == "warning"
    send(11, "ok")
    assert state()[0] == "ok" and state()[1].minute == 11
    # One batch with several windows of one machine: the latest wins, whatever the order in the batch.
    batch = batches.batch(name, summaries=[summary(name, "m1", minute=m, state=s)
                                           for m, s in ((14, "alarm"), (12, "ok"), (13, "warning"))], events=[])
    assert client.post(INGEST, json=batch, headers=bearer(token)).status_code == 200
    assert state()[0] == "alarm" and state()[1].minute == 14


def test_a_large_batch(client, gateway, conn):
    name, token = gateway
    summaries = batches.many(name, machines=50, windows=100)  # 5,000: the protocol's maximum
    events = [event(name, f"m-{m:03d}", minute=m) for m in range(200)]
    body = gzip.compress(json.dumps(batches.batch(name, summaries=summaries, events=events)).encode())
    response = client.post(INGEST, content=body, headers={**bearer(token), "Content-Type": "application/json",
                                                          "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert response.json() == result(accepted=(5000, 200))
    assert counts(conn, name) == (5000, 200)
    machines = conn.execute("SELECT count(*) FROM machines m JOIN gateways g ON g.id = m.gateway_id "
                            "WHERE g.name = %s", [name]).fetchone()[0]
    assert machines == 50


def test_events_and_summaries_are_stored_in_one_transaction(make_client, gateway, conn, monkeypatch):
    name, token = gateway
    # The summaries fail (division by zero) after the events and the gateway's status were written.
    failing = ingest.STORE.replace("s.health_last, s.p_failure_max,", "s.health_last / 0, s.p_failure_max,")
    assert failing != ingest.STORE
    monkeypatch.setattr(ingest, "STORE", failing)
    client = make_client(raise_server_exceptions=False)
    response = client.post(INGEST, json=batches.batch(name), headers=bearer(token))
    assert response.status_code == 422 and "division by zero" in response.json()["error"]["message"]
    assert counts(conn, name) == (0, 0)  # the events were rolled back with the summaries
    assert conn.execute("SELECT last_seen_at FROM gateways WHERE name = %s", [name]).fetchone()[0] is None


def test_a_batch_of_summaries_that_fails_stores_nothing_and_the_next_one_is_stored(make_client, gateway, conn,
                                                                                    monkeypatch):
    name, token = gateway
    failing = ingest.STORE.replace("s.health_last, s.p_failure_max,", "s.health_last / 0, s.p_failure_max,")
    monkeypatch.setattr(ingest, "STORE", failing)
    client = make_client(raise_server_exceptions=False)
    sent = batches.batch(name, events=[])
    assert client.post(INGEST, json=sent, headers=bearer(token)).status_code == 422
    assert counts(conn, name) == (0, 0)
    assert conn.execute("SELECT last_seen_at FROM gateways WHERE name = %s", [name]).fetchone()[0] is None
    monkeypatch.undo()  # the same client and pool: its connection is usable after the failed pipeline
    assert client.post(INGEST, json=sent, headers=bearer(token)).json() == result(accepted=(3, 0))


def test_ingest_reuses_its_plan_and_leaves_the_planner_setting_as_it_was(central_url, gateway, conn):
    """STORE is planned once per connection (planning it again per batch cost more than running it at fleet
    scale), and the setting that makes it so ends with STORE: the dashboard's queries on the same connection keep
    PostgreSQL's default, in autocommit as in the caller's transaction."""
    name, token = gateway
    gateway_id = conn.execute("SELECT id FROM gateways WHERE name = %s", [name]).fetchone()[0]
    found = Gateway(gateway_id, name, token_hash(token))

    def sent(minute: int, events: list[dict]) -> IngestBatch:
        return IngestBatch.model_validate_json(json.dumps(batches.batch(
            name, summaries=[summary(name, minute=minute)], events=events)))

    async def store() -> tuple[list[str], tuple[int, int]]:
        async with await psycopg.AsyncConnection.connect(central_url, autocommit=True) as aconn:
            await partitions.ensure_ahead(aconn, batches.T0, 0)
            aconn.prepare_threshold = 0  # prepared at once: PostgreSQL's own choice plans the first 5 anew
            settings = []
            for minute in range(3):
                await ingest.store(aconn, found, sent(minute, []), None)
                settings.append((await (await aconn.execute("SHOW plan_cache_mode")).fetchone())[0])
            async with aconn.transaction():
                await ingest.store(aconn, found, sent(3, [event(name, minute=3)]), None)
                settings.append((await (await aconn.execute("SHOW plan_cache_mode")).fetchone())[0])
            plans = await (await aconn.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%INSERT INTO summaries (gateway_id%"])).fetchone()
            return settings, plans

    settings, (generic, custom) = asyncio.run(store())
    assert settings == ["auto"] * 4
    assert (generic, custom) == (4, 0)
    assert counts(conn, name) == (4, 1)


def test_a_token_revoked_while_the_batch_was_read_stores_nothing(central_url, gateways, conn):
    name, token = gateways.add()
    gateway_id = conn.execute("SELECT id FROM gateways WHERE name = %s", [name]).fetchone()[0]
    gateways.revoke(name)
    batch = IngestBatch.model_validate_json(json.dumps(batches.batch(name)))

    async def store():
        async with await psycopg.AsyncConnection.connect(central_url, autocommit=True) as aconn:
            await ingest.store(aconn, Gateway(gateway_id, name, token_hash(token)), batch, "10.1.2.3")

    with pytest.raises(ingest.Revoked):
        asyncio.run(store())
    assert counts(conn, name) == (0, 0)


def test_gateways_cannot_collide_through_ids(client, gateways, conn):
    """Gateway B sends gateway A's (predictable) ids first: A's data is still stored as A's."""
    (a, a_token), (b, b_token) = gateways.add(), gateways.add()
    a_batch = batches.batch(a)
    stolen = batches.batch(b, summaries=[{**s, "machine_id": "decoy"} for s in a_batch["summaries"]],
                           events=a_batch["events"])
    assert client.post(INGEST, json=stolen, headers=bearer(b_token)).json() == result(accepted=(3, 1))
    assert client.post(INGEST, json=a_batch, headers=bearer(a_token)).json() == result(accepted=(3, 1))
    assert counts(conn, a) == (3, 1)


def test_the_pool_reads_settings(central_url):
    pool = db.make_pool(make_settings(central_url, pool_min_size=2, pool_max_size=3, db_timeout_s=1.5))
    assert (pool.min_size, pool.max_size, pool.timeout) == (2, 3, 1.5)
    assert pool.kwargs["application_name"] == "pdm-central" and pool.kwargs["connect_timeout"] == 2


def test_a_value_postgresql_refuses_gets_422_not_500(client, gateway, monkeypatch):
    """A 5xx makes the agent retry the same batch forever; a 422 lets it set the bad record aside."""
    name, token = gateway
    monkeypatch.setattr(ingest, "STORE", "SELECT 'not a number'::integer")
    response = client.post(INGEST, json=batches.batch(name), headers=bearer(token))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_batch" and "invalid input syntax for type integer" in error["message"]
