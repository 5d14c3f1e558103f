"""The ops API (SPEC §7): fleet overview, machines by state, a machine's summaries, events since a time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from testkit import batches
from testkit.batches import event, summary
from tests.central.support import OPS, bearer

ENDPOINTS = ["/api/v1/fleet", "/api/v1/machines", "/api/v1/events",
             "/api/v1/gateways/gw-x/machines/m-1/summaries"]


def unique_t0() -> datetime:
    """A time range no other test writes to (the events endpoint sees every gateway)."""
    return datetime(2031, 1, 1, tzinfo=UTC) + timedelta(days=random.randrange(100_000), seconds=random.randrange(86400))


def send(client, name: str, token: str, summaries=(), events=()) -> None:
    batch = batches.batch(name, summaries=list(summaries), events=list(events))
    response = client.post("/api/v1/ingest", json=batch, headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "gateway"])
def test_ops_endpoints_need_the_ops_token(client, gateway, path, authorization):
    if authorization == "gateway":
        authorization = f"Bearer {gateway[1]}"
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ENDPOINTS)
def test_without_an_ops_token_configured_the_ops_api_is_off(make_client, path):
    client = make_client(ops_token=None)
    response = client.get(path, headers=OPS)
    assert response.status_code == 401
    assert "PDM_CENTRAL_OPS_TOKEN" in response.json()["error"]["message"]


def test_the_token_is_checked_before_the_parameters(client):
    assert client.get("/api/v1/events?since=yesterday&limit=0").status_code == 401
    assert client.get("/api/v1/events?since=yesterday&limit=0", headers=OPS).status_code == 422


def test_fleet_overview(client, gateways):
    (busy, busy_token), (quiet, _) = gateways.add("busy"), gateways.add("quiet")
    send(client, busy, busy_token,
         summaries=[summary(busy, "m1", 0, "ok"), summary(busy, "m2", 0, "warning"), summary(busy, "m3", 0, "alarm"),
                    summary(busy, "m3", 1, "alarm")])
    fleet = {g["name"]: g for g in client.get("/api/v1/fleet", headers=OPS).json()["gateways"]}
    row = fleet[busy]
    assert row["machines"] == 3 and row["worst_state"] == "alarm"
    assert row["states"] == {"ok": 1, "warning": 1, "alarm": 1}
    assert row["buffer_pending"] == 12 and row["dropped_total"] == 0 and row["agent_version"] == "0.1.0"
    assert row["status"]["uptime_s"] == 3600.5
    assert datetime.fromisoformat(row["last_seen_at"]) > datetime.now(UTC) - timedelta(minutes=1)
    assert row["revoked_at"] is None
    assert fleet[quiet]["machines"] == 0 and fleet[quiet]["last_seen_at"] is None
    assert fleet[quiet]["worst_state"] is None and fleet[quiet]["buffer_pending"] is None
    # Huge numbers in one gateway's status do not break the overview.
    huge = batches.batch(busy, summaries=[], events=[],
                         gateway={"buffer_pending": 10**30, "dropped_total": 2**64, "uptime_s": 1.0})
    assert client.post("/api/v1/ingest", json=huge, headers=bearer(busy_token)).status_code == 200
    fleet = {g["name"]: g for g in client.get("/api/v1/fleet", headers=OPS).json()["gateways"]}
    assert fleet[busy]["buffer_pending"] == 10**30 and fleet[busy]["dropped_total"] == 2**64
    gateways.revoke(quiet)
    fleet = {g["name"]: g for g in client.get("/api/v1/fleet", headers=OPS).json()["gateways"]}
    assert fleet[quiet]["revoked_at"] is not None


def test_machines_by_state(client, gateways):
    (name, token) = gateways.add("states")
    send(client, name, token, summaries=[summary(name, "ok-1", 0, "ok"), summary(name, "warn-1", 0, "warning", 0.2),
                                         summary(name, "alarm-1", 0, "alarm", 0.9), summary(name, "alarm-2", 0,
                                                                                            "alarm", 0.7)])

    def machines(**params) -> list[tuple[str, str]]:
        response = client.get("/api/v1/machines", params={"gateway": name, **params}, headers=OPS)
        assert response.status_code == 200, response.text
        return [(m["machine_id"], m["state"]) for m in response.json()["machines"]]

    assert machines(state="alarm") == [("alarm-1", "alarm"), ("alarm-2", "alarm")]  # riskiest first
    assert machines(state=["warning", "alarm"]) == [("alarm-1", "alarm"), ("alarm-2", "alarm"), ("warn-1", "warning")]
    assert len(machines()) == 4
    everyone = client.get("/api/v1/machines", params={"state": "alarm"}, headers=OPS).json()["machines"]
    assert {(m["gateway"], m["machine_id"]) for m in everyone} >= {(name, "alarm-1"), (name, "alarm-2")}
    first = client.get("/api/v1/machines", params={"gateway": name, "state": "alarm"}, headers=OPS).json()
    assert first["machines"][0]["model"] == {"name": batches.MODEL["name"], "version": batches.MODEL["version"]}
    assert first["machines"][0]["p_failure_max"] == 0.9
    assert client.get("/api/v1/machines", params={"state": "broken"}, headers=OPS).status_code == 422
    assert client.get("/api/v1/machines", params={"gateway": "x'--"}, headers=OPS).status_code == 422


def test_a_machines_summaries_over_a_time_range(client, gateways):
    name, token = gateways.add("history")
    t0 = unique_t0()
    send(client, name, token, summaries=[summary(name, "m1", minute, t0=t0) for minute in range(10)]
         + [summary(name, "m2", 0, t0=t0)])
    path = f"/api/v1/gateways/{name}/machines/m1/summaries"

    def window(**params) -> dict:
        response = client.get(path, params=params, headers=OPS)
        assert response.status_code == 200, response.text
        return response.json()

    page = window(since=t0.isoformat(), until=(t0 + timedelta(minutes=10)).isoformat())
    assert page["gateway"] == name and page["machine_id"] == "m1" and page["next_cursor"] is None
    assert [s["window_start"] for s in page["summaries"]] == [(t0 + timedelta(minutes=m)).isoformat()
                                                              for m in range(10)]
    assert page["summaries"][0] | {"received_at": None, "batch_id": None} == {
        **summary(name, "m1", 0, t0=t0), "received_at": None, "batch_id": None}
    middle = window(since=(t0 + timedelta(minutes=3)).isoformat(), until=(t0 + timedelta(minutes=5)).isoformat())
    assert [s["window_start"] for s in middle["summaries"]] == [(t0 + timedelta(minutes=m)).isoformat() for m in (3, 4)]
    # Paged: every row once, in order.
    seen, cursor = [], None
    for _ in range(10):
        page = window(since=t0.isoformat(), limit=3, **({"cursor": cursor} if cursor else {}))
        seen += [s["summary_id"] for s in page["summaries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [summary(name, "m1", m, t0=t0)["summary_id"] for m in range(10)]
    # By default: from 24 hours ago, without an end (a gateway's clock may run ahead).
    assert len(window()["summaries"]) == 10
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    send(client, name, token, summaries=[summary(name, "m1", 0, t0=long_ago)])
    assert len(window()["summaries"]) == 10
    assert len(window(since=long_ago.isoformat())["summaries"]) == 11


@pytest.mark.parametrize(("params", "status"), [
    ({"since": "2031-01-01T00:00:00"}, 422),  # no time zone
    ({"since": "2031-01-02T00:00:00Z", "until": "2031-01-01T00:00:00Z"}, 422),
    ({"limit": 0}, 422),
    ({"limit": 10_001}, 422),
    ({"cursor": "not-a-cursor"}, 422),
])
def test_invalid_ranges_get_422(client, gateways, params, status):
    name, token = gateways.add()
    send(client, name, token, summaries=[summary(name, "m1")])
    for path in (f"/api/v1/gateways/{name}/machines/m1/summaries", "/api/v1/events"):
        response = client.get(path, params=params, headers=OPS)
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


def test_unknown_gateways_and_machines_get_404(client, gateways):
    name, token = gateways.add()
    send(client, name, token, summaries=[summary(name, "m1")])
    assert client.get(f"/api/v1/gateways/{name}/machines/m1/summaries", headers=OPS).status_code == 200
    for path in (f"/api/v1/gateways/{name}/machines/nope/summaries", "/api/v1/gateways/nope/machines/m1/summaries"):
        response = client.get(path, headers=OPS)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_events_since_a_time(client, gateways):
    (a, a_token), (b, b_token) = gateways.add("ev-a"), gateways.add("ev-b")
    t0 = unique_t0()
    send(client, a, a_token, events=[event(a, "m1", 0, "warning", t0=t0), event(a, "m1", 5, "alarm", "warning", t0=t0),
                                     event(a, "m2", 5, "warning", t0=t0)])
    send(client, b, b_token, events=[event(b, "m1", 5, "warning", t0=t0), event(b, "m9", 9, "ok", "alarm", t0=t0)])

    def events(**params) -> list[tuple[str, str, str]]:
        response = client.get("/api/v1/events", params={"until": (t0 + timedelta(hours=1)).isoformat(), **params},
                              headers=OPS)
        assert response.status_code == 200, response.text
        return [(e["gateway"], e["machine_id"], e["to_state"]) for e in response.json()["events"]]

    everything = events(since=t0.isoformat())
    assert len(everything) == 5 and everything[0] == (a, "m1", "warning") and everything[-1] == (b, "m9", "ok")
    since_5 = events(since=(t0 + timedelta(minutes=5)).isoformat())
    assert sorted(since_5) == sorted([(a, "m1", "alarm"), (a, "m2", "warning"), (b, "m1", "warning"), (b, "m9", "ok")])
    assert events(since=t0.isoformat(), gateway=b) == [(b, "m1", "warning"), (b, "m9", "ok")]
    assert events(since=t0.isoformat(), gateway=a, machine_id="m1") == [(a, "m1", "warning"), (a, "m1", "alarm")]
    assert events(since=t0.isoformat(), state="alarm") == [(a, "m1", "alarm")]
    # Three events share one timestamp: paging one by one still gives each exactly once.
    seen, cursor = [], None
    for _ in range(10):
        params = {"since": t0.isoformat(), "limit": 1, "until": (t0 + timedelta(hours=1)).isoformat()}
        page = client.get("/api/v1/events", params={**params, **({"cursor": cursor} if cursor else {})},
                          headers=OPS).json()
        seen += [e["event_id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and len(set(seen)) == 5
    full = client.get("/api/v1/events", params={"since": t0.isoformat(), "gateway": a, "limit": 1}, headers=OPS).json()
    first = event(a, "m1", 0, "warning", t0=t0)
    assert {k: full["events"][0][k] for k in first} == first


def test_ops_responses_are_json_objects(client):
    for path in ("/api/v1/fleet", "/api/v1/machines", "/api/v1/events"):
        response = client.get(path, headers=OPS)
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        assert isinstance(response.json(), dict)
