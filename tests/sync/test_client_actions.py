"""Gateway actions (acknowledgements, labels) in the sync client, against a scripted central and a real SQLite
outbox (issue 18 item 2): they leave the outbox only when central's answer names them; a central older than them
(422 on `actions`, or a 200 that does not mention them) costs no event, summary or action; they go later, once."""

from __future__ import annotations

import pytest

from agent.actions import ActionLog, EpisodeRef
from sync import client as sync_client
from sync.outbox import Outcome
from sync.protocol import IngestBatch
from tests.sync.test_client import accept_all, client, records

OLD_CENTRAL_422 = (422, {}, {"error": {"code": "invalid_batch", "message": "the batch is not valid: 1 error(s)",
                                       "details": [{"loc": ["actions"], "msg": "Extra inputs are not permitted",
                                                    "type": "extra_forbidden"}]}})


def new_central(unknown: frozenset[str] = frozenset()):
    def judge(batch):
        status, headers, body = accept_all(batch)
        if "actions" in batch:
            known = [a for a in batch["actions"] if a["action_id"] not in unknown]
            body["actions"] = {"accepted": len(known), "duplicates": 0,
                               "unknown": [a["action_id"] for a in batch["actions"] if a["action_id"] in unknown]}
        return status, headers, body
    return judge


def old_central(batch):
    return OLD_CENTRAL_422 if "actions" in batch else accept_all(batch)


@pytest.fixture
def actions(store):
    """Two actions on the episode opened by an event in the outbox: an acknowledgement and a label."""
    [event] = records(store, n_events=1)
    log = ActionLog(store, "gw-1")
    episode = EpisodeRef(event.record_id, event.machine_id, event.at)
    log.acknowledge(episode, event.at + 60, by="Ana")
    log.label(episode, "failure", "OSF", event.at + 120)
    return log


def test_actions_ride_with_the_events_and_leave_only_when_central_names_them(store, central, actions):
    central.judge = new_central()
    sync = client(store, central.url)
    sync._actions = actions
    assert sync.sync_once().outcome is Outcome.SYNCED
    [batch] = central.batches
    assert [a.action for a in IngestBatch.model_validate(batch).actions] == ["acknowledge", "label"]
    assert len(batch["events"]) == 1
    assert actions.pending_actions(10) == [] and store.pending(10) == []
    sync.sync_once()
    assert len(central.batches) == 1  # nothing more to send


def test_an_action_on_an_episode_central_does_not_know_yet_waits_for_the_next_round(store, central, actions):
    waiting = actions.pending_actions(10)[1].record_id
    central.judge = new_central(frozenset({waiting}))
    sync = client(store, central.url)
    sync._actions = actions
    assert sync.sync_once().outcome is Outcome.SYNCED
    assert len(central.batches) == 1  # not sent again within the round
    assert [a.record_id for a in actions.pending_actions(10)] == [waiting]
    central.judge = new_central()
    sync.sync_once()
    assert "events" in central.batches[-1] and central.batches[-1]["actions"][0]["action_id"] == waiting
    assert actions.pending_actions(10) == []


def test_a_central_older_than_actions_costs_nothing_and_gets_them_once_upgraded(store, central, actions,
                                                                                monkeypatch, caplog):
    central.judge = old_central
    sync = client(store, central.url)
    sync._actions = actions
    result = sync.sync_once()
    assert (result.outcome, result.sent, result.set_aside) == (Outcome.SYNCED, 1, 0)  # the event went, alone
    assert [("actions" in b, len(b["events"])) for b in central.batches] == [(True, 1), (False, 1)]
    assert store.pending(10) == [] and len(actions.pending_actions(10)) == 2  # kept
    assert "upgrade central" in sync.actions_error
    assert sum("does not take gateway actions" in r.message for r in caplog.records) == 1

    sync.sync_once()  # within ACTIONS_RETRY_S: not offered again
    assert all("actions" not in b for b in central.batches[2:])

    central.judge = new_central()  # central upgraded
    monkeypatch.setattr(sync_client, "ACTIONS_RETRY_S", 0.0)
    sync._actions_refused_until = 0.0
    sync.sync_once()
    assert [len(b["actions"]) for b in central.batches if "actions" in b][-1] == 2
    assert actions.pending_actions(10) == [] and sync.actions_error is None


def test_a_central_that_ignores_actions_does_not_make_the_agent_lose_them(store, central, actions):
    central.judge = accept_all  # a 200 without `actions`: read the batch, not its actions
    sync = client(store, central.url)
    sync._actions = actions
    assert sync.sync_once().outcome is Outcome.SYNCED
    assert store.pending(10) == [] and len(actions.pending_actions(10)) == 2


def test_actions_go_with_the_last_of_the_events(store, central, actions):
    """An action's episode may open with an event of the backlog: the actions wait for the batch that ends it."""
    records(store, n_events=5, n_summaries=2)  # 5 events in all (one the fixture's), 2 summaries; batches of 2
    central.judge = new_central()
    sync = client(store, central.url, batch_size=2)
    sync._actions = actions
    assert sync.sync_once().outcome is Outcome.SYNCED
    assert [(len(b["events"]), len(b["summaries"]), len(b.get("actions", []))) for b in central.batches] == [
        (2, 0, 0), (2, 0, 0), (1, 1, 2), (0, 1, 0)]
