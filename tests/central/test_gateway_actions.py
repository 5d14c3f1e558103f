"""Actions taken at a gateway on alarm episodes reach central in the ingest body (issue 18 item 2, SPEC §10): each
is applied once into its episode and the audit log, whatever the resends; an action whose episode central does not
know yet is answered `unknown` (kept by the gateway); a late label does not override a newer one given at central."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sync import protocol
from testkit import batches
from tests.central.support import OPS, bearer
from tests.central.test_alarms import ALARMS, INGEST, episodes, events_of


def action(gateway: str, opening: dict, kind: str, at: datetime | None = None, sequence: int = 0,
           **fields) -> dict:
    episode = uuid.UUID(opening["event_id"])
    return {"action_id": str(protocol.action_id(gateway, episode, kind, sequence)), "episode_id": str(episode),
            "machine_id": opening["machine_id"], "opened_at": opening["ts"], "action": kind,
            "at": (at or datetime.fromisoformat(opening["ts"]) + timedelta(minutes=1)).isoformat(), **fields}


def post(client, gateway: tuple[str, str], events: list[dict], actions: list[dict]):
    name, token = gateway
    body = batches.batch(name, summaries=[], events=events, actions=actions)
    return client.post(INGEST, json=body, headers=bearer(token))


def test_an_acknowledgement_and_a_label_from_a_gateway_are_applied_once(client, gateway):
    name = gateway[0]
    first, to_alarm, _, _ = events_of(name)
    acknowledged = action(name, first, "acknowledge", by="Ana", note="on my way", client="10.0.0.7")
    labelled = action(name, first, "label", label="failure", mode="OSF", by="Ana")
    answer = post(client, gateway, [first, to_alarm], [acknowledged, labelled])
    assert answer.status_code == 200, answer.text
    assert answer.json()["actions"] == {"accepted": 2, "duplicates": 0, "unknown": []}
    again = post(client, gateway, [first, to_alarm], [acknowledged, labelled]).json()  # a resend after a timeout
    assert again["actions"] == {"accepted": 0, "duplicates": 2, "unknown": []}

    [episode] = episodes(client, name)
    assert episode["acknowledged_by"] == f"Ana (technician at gateway {name})"
    assert datetime.fromisoformat(episode["acknowledged_at"]) == datetime.fromisoformat(acknowledged["at"])
    assert (episode["label"], episode["label_mode"]) == ("failure", "OSF")
    audit = client.get(f"{ALARMS}/{episode['id']}", headers=OPS).json()["actions"]
    assert [(a["action"], a["actor"]) for a in audit] == [("acknowledge", f"technician at gateway {name}"),
                                                          ("label", f"technician at gateway {name}")]
    assert audit[0]["detail"]["note"] == "on my way" and audit[0]["detail"]["client"] == "10.0.0.7"
    assert audit[0]["client_addr"] == "127.0.0.1"  # the gateway's own address


def test_an_action_on_an_episode_central_does_not_know_yet_is_unknown_until_its_event_arrives(client, gateway):
    name = gateway[0]
    first = events_of(name)[0]
    acknowledged = action(name, first, "acknowledge")
    answer = post(client, gateway, [], [acknowledged]).json()
    assert answer["actions"] == {"accepted": 0, "duplicates": 0, "unknown": [acknowledged["action_id"]]}
    assert episodes(client, name) == []
    answer = post(client, gateway, [first], [acknowledged]).json()
    assert answer["actions"]["accepted"] == 1
    assert episodes(client, name)[0]["acknowledged_at"] is not None


def test_a_gateway_s_late_label_does_not_override_a_newer_one_given_at_central(client, gateway):
    name = gateway[0]
    first = events_of(name)[0]
    post(client, gateway, [first], [])
    [episode] = episodes(client, name)
    response = client.post(f"{ALARMS}/{episode['id']}/label", json={"label": "false_alarm"}, headers=OPS)
    assert response.status_code == 200
    stale = action(name, first, "label", label="unsure")  # given at the gateway before central's, sent later
    assert post(client, gateway, [], [stale]).json()["actions"]["accepted"] == 1
    assert episodes(client, name)[0]["label"] == "false_alarm"
    audit = client.get(f"{ALARMS}/{episode['id']}", headers=OPS).json()["actions"]
    assert [a["detail"]["label"] for a in audit] == ["false_alarm", "unsure"]  # both recorded


def test_a_batch_without_actions_is_answered_without_the_actions_key(client, gateway):
    """An agent older than gateway actions reads the answer with a strict model: no key it does not know."""
    answer = post(client, gateway, events_of(gateway[0])[:1], [])
    assert answer.status_code == 200 and "actions" not in answer.json()


def test_a_failure_label_names_its_mode(client, gateway):
    name = gateway[0]
    first = events_of(name)[0]
    answer = post(client, gateway, [first], [action(name, first, "label", label="failure")])
    assert answer.status_code == 422
    assert answer.json()["error"]["details"][0]["loc"][:2] == ["actions", 0]


def desired_state(client, gateway: tuple[str, str], etag: str | None = None):
    name, token = gateway
    headers = {**bearer(token), **({"If-None-Match": etag} if etag else {})}
    return client.get(f"/api/v1/gateways/{name}/desired", headers=headers)


def test_the_desired_state_lists_the_acknowledged_open_episodes_by_their_opening_event(client, gateways):
    gateway, other = gateways.add(), gateways.add()
    name = gateway[0]
    first, to_alarm, back, again = events_of(name)
    post(client, gateway, [first, to_alarm, back, again], [])  # one closed episode, one open
    post(client, other, events_of(other[0])[:1], [])
    unacknowledged = desired_state(client, gateway)
    assert unacknowledged.json()["acknowledgements"] == []
    etag = unacknowledged.headers["etag"]
    assert desired_state(client, gateway, etag).status_code == 304

    closed, opened = sorted(episodes(client, name), key=lambda e: e["opened_at"])
    for episode in (closed, opened):
        client.post(f"{ALARMS}/{episode['id']}/acknowledge", json={"by": "Ops Olga"}, headers=OPS)
    changed = desired_state(client, gateway, etag)  # the same revision, a new ETag: the gateway hears of it at once
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    [acknowledged] = changed.json()["acknowledgements"]  # the open one only
    assert acknowledged["episode_id"] == again["event_id"] and acknowledged["machine_id"] == again["machine_id"]
    assert acknowledged["acknowledged_by"] == "Ops Olga (ops token)"
    assert changed.json()["revision"] == unacknowledged.json()["revision"]
    assert desired_state(client, gateway, changed.headers["etag"]).status_code == 304
    assert desired_state(client, other).json()["acknowledgements"] == []  # another gateway's episodes stay its own


def test_a_gateway_clock_running_ahead_does_not_make_its_label_win_over_a_later_one(client, gateway):
    name = gateway[0]
    first = events_of(name)[0]
    ahead = datetime.now(UTC) + timedelta(days=1)
    post(client, gateway, [first], [action(name, first, "label", at=ahead, label="unsure")])
    [episode] = episodes(client, name)
    assert episode["label"] == "unsure"
    client.post(f"{ALARMS}/{episode['id']}/label", json={"label": "false_alarm"}, headers=OPS)  # given after it
    assert episodes(client, name)[0]["label"] == "false_alarm"
    audit = client.get(f"{ALARMS}/{episode['id']}", headers=OPS).json()["actions"]
    assert datetime.fromisoformat(audit[0]["detail"]["at"]) == ahead  # the gateway's time, as it said
