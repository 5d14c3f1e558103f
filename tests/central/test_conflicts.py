"""A summary sent again under a stored summary_id with other content (issue 14 item 17): the stored one is kept,
the conflict is counted apart, logged once with both ids, and shown to ops in /api/v1/fleet."""

from __future__ import annotations

import logging

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
