"""Alarm episodes at central (issue 18 item 1, SPEC §10): built from the events exactly once and in time order
whatever order they arrive in; the API's actions and their audit log."""

from __future__ import annotations

import itertools
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.notify.outbox import delivery_id
from testkit import batches
from testkit.batches import event
from tests.central.support import OPS, bearer

INGEST = "/api/v1/ingest"
ALARMS = "/api/v1/alarms"
SITE = "https://testserver"

# One machine: a warning that becomes an alarm and returns to ok, then a second warning that is still open.
STORY = [("ok", "warning", 0), ("warning", "alarm", 1), ("alarm", "ok", 2), ("ok", "warning", 5)]


def events_of(gateway: str, story=STORY, machine: str = "press-01") -> list[dict]:
    return [event(gateway, machine, minute=m, from_state=a, to_state=b) for a, b, m in story]


def send(client, gateway: tuple[str, str], events: list[dict]) -> dict:
    name, token = gateway
    response = client.post(INGEST, json=batches.batch(name, summaries=[], events=events), headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def episodes(client, name: str, **query) -> list[dict]:
    response = client.get(ALARMS, params={"gateway": name, **query}, headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()["alarms"]


def shape(found: list[dict]) -> list[tuple]:
    return sorted((e["opened_at"], e["closed_at"], e["peak_state"], e["state"], e["events"]) for e in found)


def test_an_episode_follows_the_machine_from_warning_to_alarm_and_back_to_ok(client, gateway):
    name = gateway[0]
    first, to_alarm, back, again = events_of(name)
    send(client, gateway, [first])
    [episode] = episodes(client, name)
    assert (episode["state"], episode["peak_state"], episode["open"]) == ("warning", "warning", True)
    send(client, gateway, [to_alarm])
    [episode] = episodes(client, name)
    assert (episode["state"], episode["peak_state"], episode["open"]) == ("alarm", "alarm", True)
    send(client, gateway, [back, again])
    closed, = episodes(client, name, state="closed")
    opened, = episodes(client, name, state="open")
    assert (closed["state"], closed["peak_state"]) == ("ok", "alarm")
    assert datetime.fromisoformat(closed["closed_at"]) == datetime.fromisoformat(back["ts"])
    assert closed["events"] == 3 and opened["events"] == 1
    assert episodes(client, name)[0]["id"] == opened["id"]  # open ones first
    detail = client.get(f"{ALARMS}/{closed['id']}", headers=OPS).json()
    assert [e["event_id"] for e in detail["event_list"]] == [first["event_id"], to_alarm["event_id"],
                                                            back["event_id"]]


@pytest.mark.parametrize("order", [(3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2), (0, 2, 1, 3)])
def test_events_arriving_out_of_order_make_the_same_episodes_as_in_order(client, gateways, order):
    in_order, shuffled = gateways.add(), gateways.add()
    send(client, in_order, events_of(in_order[0]))
    for i in order:
        send(client, shuffled, [events_of(shuffled[0])[i]])
    assert shape(episodes(client, shuffled[0])) == shape(episodes(client, in_order[0]))
    assert len(episodes(client, shuffled[0])) == 2


def test_a_late_event_joining_two_episodes_keeps_the_first_and_its_actions(client, gateway, conn):
    name = gateway[0]
    ok_to_warning, warning_to_alarm, alarm_to_ok, _ = events_of(name)
    send(client, gateway, [warning_to_alarm])  # first seen: an episode opens at the alarm
    [first] = episodes(client, name)
    assert client.post(f"{ALARMS}/{first['id']}/acknowledge", json={"by": "Ana"}, headers=OPS).status_code == 200
    send(client, gateway, [alarm_to_ok, ok_to_warning])
    [episode] = episodes(client, name)
    assert episode["id"] == first["id"] and episode["acknowledged_by"] == "Ana (ops token)"
    assert episode["opened_at"] < first["opened_at"] and episode["events"] == 3


def test_a_resent_event_changes_no_episode(client, gateway, conn):
    name = gateway[0]
    story = events_of(name)
    send(client, gateway, story)
    before = episodes(client, name)
    again = send(client, gateway, story)
    assert again["duplicates"]["events"] == 4
    after = episodes(client, name)
    assert [(e["id"], e["events"]) for e in after] == [(e["id"], e["events"]) for e in before]


def test_machines_have_episodes_of_their_own(client, gateway):
    name = gateway[0]
    send(client, gateway, events_of(name, machine="m-a") + events_of(name, machine="m-b")[:1])
    assert len(episodes(client, name, machine="m-a")) == 2
    [only] = episodes(client, name, machine="m-b")
    assert only["machine_id"] == "m-b"


def test_acknowledge_comment_assign_label_each_leave_an_audit_row(make_client, gateway):
    client = make_client(peer="10.20.30.40")
    name = gateway[0]
    send(client, gateway, events_of(name)[:1])
    [episode] = episodes(client, name)
    url = f"{ALARMS}/{episode['id']}"
    assert client.post(url + "/acknowledge", headers=OPS).status_code == 200
    assert client.post(url + "/acknowledge", json={"by": "Later"}, headers=OPS).json()["acknowledged_by"] == \
        "ops token"  # the first acknowledgement stands
    assert client.post(url + "/comment", json={"text": "bearing noise", "by": "Ana"}, headers=OPS).status_code == 200
    assert client.post(url + "/assign", json={"assignee": "Bo"}, headers=OPS).json()["assignee"] == "Bo"
    labelled = client.post(url + "/label", json={"label": "failure", "mode": "TWF"}, headers=OPS).json()
    assert (labelled["label"], labelled["label_mode"]) == ("failure", "TWF")
    actions = client.get(url, headers=OPS).json()["actions"]
    assert [a["action"] for a in actions] == ["acknowledge", "acknowledge", "comment", "assign", "label"]
    assert {a["client_addr"] for a in actions} == {"10.20.30.40"}
    assert {a["actor"] for a in actions} == {"ops token"}
    assert actions[2]["detail"] == {"text": "bearing noise", "by": "Ana"}


def test_the_audit_names_the_client_a_trusted_proxy_forwarded(make_client, gateway):
    client = make_client(trusted_proxies=["127.0.0.1"])
    send(client, gateway, events_of(gateway[0])[:1])
    [episode] = episodes(client, gateway[0])
    url = f"{ALARMS}/{episode['id']}"
    client.post(url + "/comment", json={"text": "x"}, headers={**OPS, "X-Forwarded-For": "192.0.2.7"})
    untrusted = make_client(peer="198.51.100.1")
    untrusted.post(url + "/comment", json={"text": "y"}, headers={**OPS, "X-Forwarded-For": "192.0.2.8"})
    assert [a["client_addr"] for a in client.get(url, headers=OPS).json()["actions"]] == ["192.0.2.7",
                                                                                          "198.51.100.1"]


@pytest.mark.parametrize("body", [{"label": "failure"}, {"label": "false_alarm", "mode": "TWF"}, {"label": "real"},
                                  {"label": "unsure", "extra": 1}])
def test_a_wrong_label_is_refused_with_the_error_envelope(client, gateway, body):
    send(client, gateway, events_of(gateway[0])[:1])
    [episode] = episodes(client, gateway[0])
    response = client.post(f"{ALARMS}/{episode['id']}/label", json=body, headers=OPS)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(("text", "taken"), [("line one\n\tline two", True), ("\u202egnirae", False),
                                             ("\x1b]0;owned\x07", False), ("zero\u200bwidth", False)])
def test_a_note_may_span_lines_but_not_hide_or_reorder_what_is_shown(client, gateway, text, taken):
    send(client, gateway, events_of(gateway[0])[:1])
    [episode] = episodes(client, gateway[0])
    response = client.post(f"{ALARMS}/{episode['id']}/comment", json={"text": text}, headers=OPS)
    assert response.status_code == (200 if taken else 422)
    if not taken:
        assert response.json()["error"]["code"] == "invalid_request"


def test_without_credentials_or_for_an_unknown_episode(client, gateway):
    assert client.get(ALARMS).status_code == 401
    assert client.post(f"{ALARMS}/1/acknowledge").status_code == 401
    missing = client.post(f"{ALARMS}/{2**62}/acknowledge", headers=OPS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get(ALARMS, params={"cursor": "bm9wZQ"}, headers=OPS).status_code == 422


def test_a_dashboard_session_acts_only_from_the_site_s_own_page(make_client, gateway):
    browser = make_client()
    browser.base_url = SITE
    send(browser, gateway, events_of(gateway[0])[:1])
    [episode] = episodes(browser, gateway[0])
    signed_in = browser.post("/login", data={"token": OPS[  # the login form takes the ops token
        "Authorization"].removeprefix("Bearer ")}, headers={"Origin": SITE}, follow_redirects=False)
    assert signed_in.status_code == 303
    url = f"{ALARMS}/{episode['id']}/acknowledge"
    assert browser.post(url, headers={"Origin": "https://evil.example"}).status_code == 403
    acknowledged = browser.post(url, json={"by": "Ana"}, headers={"Origin": SITE})
    assert acknowledged.status_code == 200, acknowledged.text
    assert acknowledged.json()["acknowledged_by"] == "Ana (dashboard session)"
    assert browser.get(f"{ALARMS}/{episode['id']}").json()["actions"][0]["actor"] == "dashboard session"


def test_the_list_pages_with_a_cursor_open_ones_first(client, gateways):
    gateway = gateways.add()
    name = gateway[0]
    story = list(itertools.chain.from_iterable(
        [event(name, "m1", minute=10 * i, to_state="alarm"), event(name, "m1", minute=10 * i + 1, from_state="alarm",
                                                                   to_state="ok")] for i in range(5)))
    send(client, gateway, story + [event(name, "m2", minute=3)])
    seen, cursor = [], None
    while True:
        page = client.get(ALARMS, params={"gateway": name, "limit": 2, **({"cursor": cursor} if cursor else {})},
                          headers=OPS).json()
        seen += page["alarms"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 6 and len({e["id"] for e in seen}) == 6
    assert seen[0]["machine_id"] == "m2" and seen[0]["open"]
    assert [e["opened_at"] for e in seen[1:]] == sorted((e["opened_at"] for e in seen[1:]), reverse=True)


def test_the_openapi_document_has_the_alarm_routes_with_the_error_envelope(client):
    document = client.get("/api/v1/openapi.json").json()
    for path, method in [(ALARMS, "get"), (ALARMS + "/{episode_id}", "get"),
                         (ALARMS + "/{episode_id}/acknowledge", "post"), (ALARMS + "/{episode_id}/label", "post"),
                         ("/api/v1/notifications/deliveries", "get")]:
        responses = document["paths"][path][method]["responses"]
        assert responses["401"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
        assert "429" in responses


def test_delivery_ids_are_stable_and_distinct_per_episode_transition_route_channel():
    ids = {delivery_id(e, t, r, c) for e in (1, 2) for t in ("opened", "closed") for r in ("a",) for c in ("x", "y")}
    assert len(ids) == 8 and delivery_id(1, "opened", "a", "x") == delivery_id(1, "opened", "a", "x")
    assert isinstance(delivery_id(1, "opened", "a", "x"), uuid.UUID)


STATES = ("ok", "warning", "alarm")


@st.composite
def histories(draw):
    """A machine's transitions (each from the state the previous one reached), cut into batches sent in any order."""
    steps = draw(st.lists(st.sampled_from(STATES), min_size=1, max_size=12))
    story, state = [], "ok"
    for minute, to_state in enumerate(steps):
        if to_state != state:
            story.append((state, to_state, minute))
            state = to_state
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(story) - 1)), max_size=4)))
    parts = [story[a:b] for a, b in zip([0, *cuts], [*cuts, len(story)], strict=True) if story[a:b]]
    return story, draw(st.permutations(parts))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_any_arrival_order_of_a_history_makes_the_episodes_of_its_time_order(client, gateways, history):
    story, parts = history
    in_order, shuffled = gateways.add(), gateways.add()
    if story:
        send(client, in_order, events_of(in_order[0], story))
    for part in parts:
        send(client, shuffled, events_of(shuffled[0], part))
    assert shape(episodes(client, shuffled[0])) == shape(episodes(client, in_order[0]))
    expected = sum(1 for a, _, _ in story if a == "ok")
    assert len(episodes(client, in_order[0])) == expected


def test_concurrent_batches_of_one_machine_neither_deadlock_nor_split_an_episode(client, gateways):
    gateway = gateways.add()
    name = gateway[0]
    story = [("ok", "warning", 0), ("warning", "alarm", 1), ("alarm", "warning", 2), ("warning", "alarm", 3),
             ("alarm", "ok", 4), ("ok", "alarm", 5), ("alarm", "ok", 6), ("ok", "warning", 7)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda one: send(client, gateway, events_of(name, [one])), reversed(story)))
    reference = gateways.add()
    send(client, reference, events_of(reference[0], story))
    assert shape(episodes(client, name)) == shape(episodes(client, reference[0]))
    assert len(episodes(client, name)) == 3
