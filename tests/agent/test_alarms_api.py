"""The agent's alarm episodes over real HTTP on a real agent (issue 18 item 2, SPEC §10): the open episodes of its
machines, named by the event that opened them; a technician with the status token acknowledges and labels them,
each action stored once in the agent's SQLite until central takes it."""

from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from drivers.base import RawReading
from sync.protocol import action_id
from tests.agent.test_status import (
    HEALTHY,
    READINGS_EACH,
    TOKEN,
    error_of,
    families,
    open_agent,
    token_agent,
    value,
    wait_for,
)

ALARMS = "/api/v1/alarms"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A fed agent with a status token: m-hdf and m-ood in alarm, m-ok ok."""
    with token_agent(tmp_path_factory.mktemp("alarms")) as running:
        yield running


def alarms(agent) -> list[dict]:
    response = agent.get(ALARMS, TOKEN)
    assert response.status_code == 200, response.text
    return response.json()["alarms"]


def post(agent, episode: str, action: str, body: dict | None = None, token: str | None = TOKEN):
    return agent.get(f"{ALARMS}/{episode}/{action}", token, method="POST", json=body)


def stored_actions(agent) -> list[tuple[str, str, str, object]]:
    with sqlite3.connect(agent.agent.store.path) as db:
        return db.execute("SELECT action_id, episode_id, kind, synced_at FROM actions ORDER BY id").fetchall()


def test_the_open_episodes_are_named_by_the_event_that_opened_them(agent):
    listed = alarms(agent)
    assert [(a["machine_id"], a["state"], a["open"]) for a in listed] == [("m-hdf", "alarm", True),
                                                                        ("m-ood", "alarm", True)]
    events = {e["machine_id"]: e for e in agent.get("/api/v1/events", TOKEN).json()["events"]}
    for alarm in listed:
        opening = events[alarm["machine_id"]]
        assert opening["from_state"] == "ok" and alarm["episode_id"] == opening["event_id"]
        assert alarm["opened_at"] == opening["ts"] and alarm["age_s"] >= 0
        assert alarm["acknowledged_at"] is None and alarm["label"] is None and alarm["pending_sync"] == 0
    assert listed[0]["dominant"]["mode"] == "HDF" and listed[0]["health"] < 50
    assert agent.get(ALARMS, TOKEN).json()["can_act"] is True


def alarm_metrics(agent) -> tuple[float, float, float]:
    metrics = families(agent.get("/metrics", TOKEN).text)
    return tuple(value(metrics, f"pdm_alarm_{name}") for name in
                 ("episodes_open", "episodes_unacknowledged", "actions_pending"))


def test_a_technician_acknowledges_once_and_labels_and_each_action_is_kept_once(agent):
    assert alarm_metrics(agent) == (2, 2, 0)
    episode = next(a for a in alarms(agent) if a["machine_id"] == "m-hdf")["episode_id"]
    first = post(agent, episode, "acknowledge", {"by": "Ana", "note": "on my way"})
    assert first.status_code == 200, first.text
    acknowledged = first.json()
    assert (acknowledged["acknowledged_by"], acknowledged["acknowledged_where"]) == ("Ana", "gateway")
    again = post(agent, episode, "acknowledge", {"by": "Bo"}).json()  # a second click, or a colleague: first stands
    assert (again["acknowledged_at"], again["acknowledged_by"]) == (acknowledged["acknowledged_at"], "Ana")

    assert post(agent, episode, "label", {"label": "failure", "mode": "HDF", "by": "Ana"}).json()["label_mode"] == "HDF"
    post(agent, episode, "label", {"label": "failure", "mode": "HDF"})  # the same label again: nothing new
    relabelled = post(agent, episode, "label", {"label": "false_alarm", "by": "Ana"}).json()
    assert (relabelled["label"], relabelled["label_mode"], relabelled["pending_sync"]) == ("false_alarm", None, 3)

    gateway = agent.agent.config.gateway_id
    opening = uuid.UUID(episode)
    stored = stored_actions(agent)
    assert [(episode_id, kind, synced) for _, episode_id, kind, synced in stored] == [
        (episode, "acknowledge", None), (episode, "label", None), (episode, "label", None)]
    assert stored[0][0] == str(action_id(gateway, opening, "acknowledge", 0))  # one per episode, on both ends
    assert len({action for action, _, _, _ in stored}) == 3
    listed = next(a for a in alarms(agent) if a["episode_id"] == episode)
    assert (listed["acknowledged_by"], listed["label"], listed["pending_sync"]) == ("Ana", "false_alarm", 3)
    assert agent.get(ALARMS, TOKEN).json()["actions_pending"] == 3
    assert alarm_metrics(agent) == (2, 1, 3)


@pytest.mark.parametrize(("body", "where"), [
    ({"label": "failure"}, "mode"), ({"label": "broken"}, "label"), ({"label": "unsure", "mode": "HDF"}, "mode"),
    ({"label": "failure", "mode": "XYZ"}, None), ({"label": "unsure", "by": "a\nb"}, "by")])
def test_an_invalid_label_is_refused_with_a_one_line_reason(agent, body, where):
    episode = alarms(agent)[-1]["episode_id"]
    error = error_of(post(agent, episode, "label", body), 422, "invalid_request")
    assert "\n" not in error["message"]
    assert where is None or where in error["message"] or where in str(error["details"])


def test_an_unknown_episode_is_404_and_a_malformed_id_422(agent):
    error_of(post(agent, str(uuid.uuid4()), "acknowledge"), 404, "not_found")
    error_of(post(agent, "not-an-id", "acknowledge"), 422, "invalid_request")


def test_acting_needs_the_status_token(agent):
    episode = alarms(agent)[0]["episode_id"]
    error_of(post(agent, episode, "acknowledge", token=None), 401, "unauthorized")
    error_of(post(agent, episode, "acknowledge", token="wrong-token-0123456789"), 401, "unauthorized")


def test_without_a_status_token_the_alarms_are_shown_but_acting_is_off(tmp_path, mqtt_broker):
    """Loopback-only and unauthenticated: any page the gateway's browser opens could post, so no writes."""
    with open_agent(tmp_path, mqtt_broker) as served:
        refused(served)


def refused(served) -> None:
    listed = served.get(ALARMS).json()
    assert listed["can_act"] is False and len(listed["alarms"]) == 2
    error = error_of(post(served, listed["alarms"][0]["episode_id"], "acknowledge", token=None), 403, "forbidden")
    assert "status.token" in error["message"]


def test_a_closed_episode_is_listed_as_recently_closed_and_can_still_be_labelled(tmp_path):
    with token_agent(tmp_path) as running:
        episode = next(a for a in alarms(running) if a["machine_id"] == "m-hdf")["episode_id"]
        start = time.time()
        for i in range(READINGS_EACH):  # m-hdf back to healthy readings: the alarm ends
            running.agent.pipeline.put(RawReading("m-hdf", start + i, dict(HEALTHY), "test", time.time()))
        store = running.agent.store
        wait_for(lambda: len(store.outbox("event", pending=False)) == 3, "the return to ok")

        listed = running.get(ALARMS, TOKEN).json()
        assert [a["machine_id"] for a in listed["alarms"]] == ["m-ood"]
        [closed] = listed["closed"]
        assert (closed["episode_id"], closed["open"], closed["state"]) == (episode, False, "ok")
        assert closed["closed_at"] > closed["opened_at"] and closed["age_s"] > 0
        labelled = post(running, episode, "label", {"label": "false_alarm", "by": "Ana"})
        assert labelled.status_code == 200 and labelled.json()["label"] == "false_alarm"
        assert running.get(ALARMS, TOKEN).json()["closed"][0]["label"] == "false_alarm"
