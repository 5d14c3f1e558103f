"""Fuzzing `POST /api/v1/ingest` on the real app and a real PostgreSQL: any body (bytes, JSON of any shape, a valid
batch with hostile values, gzip, truncated gzip, bombs) gets 200 or a 4xx, never a 5xx; a 200 stores exactly what
it counts; sending the same body again stores nothing more and counts it all as duplicates."""

from __future__ import annotations

import copy
import gzip
import json
import uuid
from datetime import timedelta

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from sync.protocol import IngestResult
from testkit import batches
from tests.central.conftest import central_url, gateways, make_client, no_central_environment  # noqa: F401
from tests.central.support import bearer
from tests.fuzz.strategies import bad_utf8, fuzz_settings, json_values, nested, spoil_utf8, to_json

INGEST = "/api/v1/ingest"
MAX_BODY = 64 * 1024  # small, so that hypothesis reaches the limits

hostile = st.one_of(
    json_values,
    st.sampled_from([
        "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2026-02-30T00:00:00Z", "2026-03-01T08:00:00",
        "+002026-03-01T08:00:00Z", "a\x00b", "\u202e", "x" * 201, "x" * 10_000, 2**31, 2**31 - 1, -1, 2**63, 10**30,
        1e308, -0.0, 5e-324, float("nan"), float("inf"), "00000000-0000-0000-0000-000000000000", "not-a-uuid",
        {"": 0.5}, {"a" * 65: 0.5}, {"TWF": 1.0000001}, [], {}, None, True, 0.5, 1.0, 100.0, "ok", "alarm",
    ]),
)
# Where a hostile value goes in a batch: a top-level field, a field of a summary or an event, the gateway status,
# or a key inside one of their maps.
SUMMARY_FIELDS = list(batches.summary("gw"))
EVENT_FIELDS = list(batches.event("gw"))
spots = st.one_of(
    st.tuples(st.sampled_from(["gateway_id", "batch_id", "sent_at", "agent_version", "summaries", "events", "gateway",
                               "extra"])),
    st.tuples(st.just("summaries"), st.integers(0, 2), st.sampled_from([*SUMMARY_FIELDS, "extra"])),
    st.tuples(st.just("events"), st.just(0), st.sampled_from([*EVENT_FIELDS, "extra"])),
    st.tuples(st.just("gateway"), st.sampled_from(["buffer_pending", "dropped_total", "dropped", "uptime_s"])),
    st.tuples(st.just("summaries"), st.integers(0, 2), st.sampled_from(["mode_risk_max", "inputs", "model"]),
              st.text(max_size=8)),
    st.tuples(st.just("events"), st.just(0), st.sampled_from(["mode_risk", "reading", "model"]), st.text(max_size=8)),
)


def spoiled(batch: dict, changes) -> dict:
    batch = copy.deepcopy(batch)
    for spot, value in changes:
        node = batch
        for part in spot[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                break
        else:
            in_list = isinstance(node, list) and isinstance(spot[-1], int) and spot[-1] < len(node)
            if isinstance(node, dict) or in_list:
                node[spot[-1]] = copy.deepcopy(value)  # a shared constant set twice would nest in itself
    return batch


def gzipped(body: bytes, how: str) -> bytes:
    packed = gzip.compress(body, 1)
    return {"gzip": packed, "truncated": packed[: len(packed) // 2], "twice": packed + packed,
            "trailing-junk": packed + b"junk"}[how]


@st.composite
def requests(draw, gateway: str):
    """(body bytes, headers without the token)."""
    kind = draw(st.sampled_from(["batch", "batch", "batch", "json", "bytes", "nested", "bomb"]))
    if kind == "batch":
        minute = draw(st.integers(0, 10**6))
        t0 = batches.T0 + timedelta(minutes=minute)
        machines = draw(st.lists(st.sampled_from(["press-01", "press-02", "m.3"]), min_size=0, max_size=3))
        batch = batches.batch(gateway, summaries=[batches.summary(gateway, m, minute=i, t0=t0)
                                                  for i, m in enumerate(machines)],
                              events=draw(st.sampled_from([[], [batches.event(gateway, t0=t0)]])))
        batch["batch_id"] = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
        batch = spoiled(batch, draw(st.lists(st.tuples(spots, hostile), max_size=3)))
        body = to_json(batch)
        if draw(st.booleans()):
            body = draw(st.builds(spoil_utf8, st.just(body), st.integers(min_value=0), bad_utf8))
    elif kind == "json":
        body = to_json(draw(json_values))
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "nested":
        body = nested(draw(st.integers(1_000, MAX_BODY // 2 - 1)))
    else:
        body = b"[" + b" " * draw(st.integers(MAX_BODY, 4 * MAX_BODY)) + b"]"  # compresses to a few hundred bytes
    encoding = draw(st.sampled_from([None, None, "gzip", "truncated", "twice", "trailing-junk", "identity", "br",
                                     " GZIP ", "gzip, gzip"]))
    headers = {"Content-Type": draw(st.sampled_from(["application/json"] * 4 + ["text/plain",
                                                                                "application/json; charset=utf-8"]))}
    if encoding in ("gzip", "truncated", "twice", "trailing-junk"):
        body, headers["Content-Encoding"] = gzipped(body, encoding), "gzip"
    elif encoding is not None:
        headers["Content-Encoding"] = encoding
    return body, headers


@pytest.fixture
def central(make_client):  # noqa: F811
    return make_client(raise_server_exceptions=False, max_body_bytes=MAX_BODY)


def present(conn, gateway: str, sent: dict) -> tuple[int, int]:
    """(summaries, events) of `sent` that this gateway has stored, by id."""
    return conn.execute("""
        SELECT (SELECT count(*) FROM summaries s WHERE s.gateway_id = g.id AND s.summary_id = ANY(%(s)s::uuid[])),
               (SELECT count(*) FROM events e WHERE e.gateway_id = g.id AND e.event_id = ANY(%(e)s::uuid[]))
        FROM gateways g WHERE g.name = %(g)s""", {"g": gateway, "s": list({s["summary_id"] for s in sent["summaries"]}),
                                                 "e": list({e["event_id"] for e in sent["events"]})}).fetchone()


def totals(conn, gateway: str) -> tuple[int, int]:
    return conn.execute("""
        SELECT (SELECT count(*) FROM summaries s WHERE s.gateway_id = g.id),
               (SELECT count(*) FROM events e WHERE e.gateway_id = g.id)
        FROM gateways g WHERE g.name = %s""", [gateway]).fetchone()


@fuzz_settings(short=50, long=5_000)
@given(data=st.data())
def test_any_body_gets_200_or_4xx_and_a_200_stores_exactly_what_it_counts(
        central, gateways, central_url, data):  # noqa: F811
    import psycopg

    if not hasattr(central, "gateway"):  # one gateway for the whole test: its rows accumulate across examples
        central.gateway = gateways.add("fuzz")
    name, token = central.gateway
    body, headers = data.draw(requests(name))
    headers = {**headers, **bearer(token)}
    with psycopg.connect(central_url, autocommit=True) as conn:
        before = totals(conn, name)
        response = central.post(INGEST, content=body, headers=headers)
        event(f"status {response.status_code}")  # --hypothesis-show-statistics shows the mix
        assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["code"], response.text
            assert totals(conn, name) == before  # refused: nothing stored
            return
        result = IngestResult.model_validate_json(response.content)
        sent = json.loads(gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body)
        sent.setdefault("summaries", []), sent.setdefault("events", [])
        new = (result.accepted.summaries, result.accepted.events)
        assert totals(conn, name) == (before[0] + new[0], before[1] + new[1])  # stored what it counted, no more
        assert (new[0] + result.duplicates.summaries, new[1] + result.duplicates.events) == (
            len(sent["summaries"]), len(sent["events"]))
        assert present(conn, name, sent) == (len({s["summary_id"] for s in sent["summaries"]}),
                                             len({e["event_id"] for e in sent["events"]}))  # every record is there

        again = central.post(INGEST, content=body, headers=headers)  # the agent re-sends after a lost answer
        assert again.status_code == 200, again.text
        repeat = IngestResult.model_validate_json(again.content)
        assert (repeat.accepted.summaries, repeat.accepted.events) == (0, 0)
        assert (repeat.duplicates.summaries, repeat.duplicates.events) == (len(sent["summaries"]), len(sent["events"]))
        assert totals(conn, name) == (before[0] + new[0], before[1] + new[1])
