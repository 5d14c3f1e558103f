"""A summary sent again under a stored summary_id with other content (issue 14 item 17): the stored one is kept,
the conflict is counted apart, logged once with both ids, and shown to ops in /api/v1/fleet."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import psycopg

from central import conflicts as central_conflicts
from central.auth import Gateway, token_hash
from sync.protocol import Summary
from testkit import batches
from tests.central.support import OPS, bearer

INGEST = "/api/v1/ingest"


def conflicts_of(client, name: str) -> int:
    fleet = {g["name"]: g for g in client.get("/api/v1/fleet", headers=OPS).json()["gateways"]}
    return fleet[name]["conflicting_duplicates"]


def test_a_resend_with_the_same_content_is_a_plain_duplicate(client, gateway):
    name, token = gateway
    batch = batches.batch(name)
    assert client.post(INGEST, json=batch, headers=bearer(token)).status_code == 200
    again = client.post(INGEST, json={**batch, "batch_id": batches.batch(name)["batch_id"]}, headers=bearer(token))
    assert again.json()["duplicates"] == {"summaries": 3, "events": 1}
    assert conflicts_of(client, name) == 0


def test_a_conflicting_duplicate_is_kept_apart_logged_once_and_shown_to_ops(client, gateway, conn, caplog):
    name, token = gateway
    first = batches.batch(name, summaries=[batches.summary(name, "press-01", minute=0)], events=[])
    assert client.post(INGEST, json=first, headers=bearer(token)).status_code == 200
    stolen_id = first["summaries"][0]["summary_id"]
    other = batches.summary(name, "press-02", minute=0, summary_id=stolen_id, p_failure_max=0.5)
    with caplog.at_level(logging.WARNING, logger="central"):
        for _ in range(3):
            second = batches.batch(name, summaries=[other], events=[])
            answer = client.post(INGEST, json=second, headers=bearer(token))
            assert answer.status_code == 200  # the protocol's answer: a duplicate (the agent must not stall)
            assert answer.json()["duplicates"]["summaries"] == 1
    stored = conn.execute("SELECT machine_id, batch_id::text FROM summaries s JOIN gateways g ON g.id = s.gateway_id "
                          "WHERE g.name = %s AND s.summary_id = %s", [name, stolen_id]).fetchall()
    assert stored == [("press-01", first["batch_id"])]  # the first one stays
    assert conflicts_of(client, name) == 3
    lines = [r.getMessage() for r in caplog.records if stolen_id in r.getMessage()]
    assert len(lines) == 1 and "press-01" in lines[0] and "press-02" in lines[0], lines
    assert first["batch_id"] in lines[0] and second["batch_id"] not in lines[0]  # the first conflicting batch's


def conflicts(conn, name: str) -> list[tuple[str, str, str, int]]:
    return conn.execute("SELECT c.summary_id::text, c.stored_machine_id, c.sent_machine_id, c.times "
                        "FROM summary_conflicts c JOIN gateways g ON g.id = c.gateway_id WHERE g.name = %s "
                        "ORDER BY 1", [name]).fetchall()


def test_a_key_sent_twice_in_one_batch_with_other_content_is_a_conflict(client, gateway, conn):
    """The comparison is in ingest's statement (central/conflicts.py): a twin is compared with the row that statement
    stored, which its snapshot does not show."""
    name, token = gateway
    kept = batches.summary(name, "press-01", minute=0)
    twin = {**kept, "machine_id": "press-02"}
    answer = client.post(INGEST, json=batches.batch(name, summaries=[kept, twin], events=[]), headers=bearer(token))
    assert answer.json()["accepted"]["summaries"] == 1 and answer.json()["duplicates"]["summaries"] == 1
    assert conflicts(conn, name) == [(kept["summary_id"], "press-01", "press-02", 1)]


def test_only_the_conflicting_duplicates_of_a_mixed_batch_are_counted(client, gateway, conn):
    name, token = gateway
    first = [batches.summary(name, "press-01", minute=m) for m in range(3)]
    answer = client.post(INGEST, json=batches.batch(name, summaries=first, events=[]), headers=bearer(token))
    assert answer.status_code == 200
    changed = {**first[1], "readings": first[1]["readings"] + 1}
    mixed = [first[0], changed, batches.summary(name, "press-01", minute=3)]
    answer = client.post(INGEST, json=batches.batch(name, summaries=mixed, events=[]), headers=bearer(token)).json()
    assert answer["accepted"]["summaries"] == 1 and answer["duplicates"]["summaries"] == 2
    assert conflicts(conn, name) == [(first[1]["summary_id"], "press-01", "press-01", 1)]
    assert conflicts_of(client, name) == 1


def test_record_compares_the_duplicates_the_statement_could_not(client, gateway, conn, central_url, caplog):
    """conflicts.record: for duplicates a concurrent batch stored after ingest's snapshot, in a statement of its own."""
    name, token = gateway
    stored = batches.summary(name, "press-01", minute=0)
    assert client.post(INGEST, json=batches.batch(name, summaries=[stored], events=[]),
                       headers=bearer(token)).status_code == 200
    gateway_id = conn.execute("SELECT id FROM gateways WHERE name = %s", [name]).fetchone()[0]
    sent = Summary.model_validate_json(json.dumps({**stored, "machine_id": "press-09"}))
    same = Summary.model_validate_json(json.dumps(stored))

    async def record():
        async with await psycopg.AsyncConnection.connect(central_url, autocommit=True) as aconn:
            await central_conflicts.record(aconn, Gateway(gateway_id, name, token_hash(token)), uuid.uuid4(), [sent, same])

    with caplog.at_level(logging.WARNING, logger="central"):
        asyncio.run(record())
    assert conflicts(conn, name) == [(stored["summary_id"], "press-01", "press-09", 1)]
    assert sum(stored["summary_id"] in r.getMessage() for r in caplog.records) == 1
