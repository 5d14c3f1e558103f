"""A gateway's machines at central are bounded (issue 22 item 6): new machines beyond the limit are refused with a
422 that names each refused record, so the agent sets exactly those aside and the rest of its batch is stored."""

from __future__ import annotations

import logging

import pytest

from testkit import batches
from testkit.batches import event, summary
from tests.central.support import bearer

INGEST = "/api/v1/ingest"


@pytest.fixture
def client(make_client):
    return make_client(max_machines_per_gateway=3)


def machines(conn, name: str) -> list[str]:
    return [m for (m,) in conn.execute("SELECT m.machine_id FROM machines m JOIN gateways g ON g.id = m.gateway_id"
                                       " WHERE g.name = %s ORDER BY 1", [name])]


def test_new_machines_beyond_the_limit_are_refused_record_by_record(client, gateway, conn, caplog):
    name, token = gateway
    caplog.set_level(logging.WARNING, logger="central")
    first = batches.batch(name, summaries=[summary(name, f"m{i}") for i in (1, 2)], events=[])
    assert client.post(INGEST, json=first, headers=bearer(token)).status_code == 200

    # Two new machines where there is room for one: the first by id is taken, m4's records are refused.
    mixed = batches.batch(name, summaries=[summary(name, "m4"), summary(name, "m3"), summary(name, "m1", minute=1)],
                          events=[event(name, "m4")])
    refused = client.post(INGEST, json=mixed, headers=bearer(token))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "too_many_machines" and "limit is 3" in error["message"]
    assert [d["loc"] for d in error["details"]] == [["summaries", 0, "machine_id"], ["events", 0, "machine_id"]]
    assert machines(conn, name) == ["m1", "m2"]  # nothing of a refused batch is stored

    # What the agent's split sends next: the records not refused are stored, a refused one alone is refused again.
    rest = batches.batch(name, summaries=[summary(name, "m3"), summary(name, "m1", minute=1)], events=[])
    assert client.post(INGEST, json=rest, headers=bearer(token)).status_code == 200
    alone = batches.batch(name, summaries=[summary(name, "m4")], events=[])
    assert client.post(INGEST, json=alone, headers=bearer(token)).status_code == 422
    assert machines(conn, name) == ["m1", "m2", "m3"]
    # Ops are told once a minute per gateway, with how many records were refused: not a line per batch.
    lines = [r.getMessage() for r in caplog.records if "of new machines refused" in r.getMessage()]
    expected = (f"gateway {name}: 2 record(s) of new machines refused since the last such line: it has 2 machines, "
                "the limit is 3")
    assert lines == [expected], lines

    # Known machines go on at the limit.
    known = batches.batch(name, summaries=[summary(name, "m2", minute=5)], events=[event(name, "m3")])
    assert client.post(INGEST, json=known, headers=bearer(token)).status_code == 200


def test_the_limit_is_per_gateway(client, gateways, conn):
    for _ in range(2):
        name, token = gateways.add()
        full = batches.batch(name, summaries=[summary(name, f"m{i}") for i in range(3)], events=[])
        assert client.post(INGEST, json=full, headers=bearer(token)).status_code == 200
        assert len(machines(conn, name)) == 3


def test_a_machine_named_null_counts_as_a_machine(client, gateway, conn):
    """The batch's machine ids reach the limit's check as an array literal: a machine named NULL is a name there."""
    name, token = gateway
    full = batches.batch(name, summaries=[summary(name, m) for m in ("m1", "m2", "NULL")], events=[])
    assert client.post(INGEST, json=full, headers=bearer(token)).status_code == 200
    refused = client.post(INGEST, json=batches.batch(name, summaries=[summary(name, "null")], events=[]),
                          headers=bearer(token))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_many_machines"
    assert machines(conn, name) == ["NULL", "m1", "m2"]
