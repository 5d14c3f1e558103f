"""The agent's open alarm episodes (agent/episodes.py) from the machines' saved alarms and a real SQLite outbox: named
by the event that opened them, as central names them; a machine whose alarm an older agent saved (no episode in it)
still has its episode, from its events."""

from __future__ import annotations

import json

from agent.episodes import closed_episodes, open_episodes
from agent.machines import Machines
from agent.store import Store
from model.package import load
from sync.remote import AlarmsConfig, SummaryConfig
from tests.agent.test_summaries import stored

T0 = 1_790_000_000.0


def test_an_episode_is_named_by_its_opening_event_and_closes_with_the_return_to_ok(tmp_path):
    machines = Machines("gw-1", SummaryConfig(window_s=60), AlarmsConfig(enter_after=1, leave_after=1), load(), {})
    with Store.open(tmp_path / "agent.db") as store:
        def feed(ts: float, p_failure: float, health: float) -> list:
            reading = stored(ts, health=health, p=p_failure, state="alarm" if health < 40 else "ok")
            outbox, saved = machines.update([reading], [], ts)
            store.write([], [], outbox, saved)
            return [r for r in outbox if r.kind == "event"]

        feed(T0, 0.01, 95.0)
        [opening] = feed(T0 + 1, 0.9, 10.0)
        [episode] = open_episodes(store.machines("$.alarm"), store)
        assert (episode.ref.episode_id, episode.ref.opened_at, episode.state) == (opening.record_id, T0 + 1, "alarm")
        feed(T0 + 2, 0.9, 12.0)  # still the same episode
        assert [e.ref.episode_id for e in open_episodes(store.machines("$.alarm"), store)] == [opening.record_id]
        assert closed_episodes(store, 10) == []
        [closing] = feed(T0 + 3, 0.01, 95.0)
        assert open_episodes(store.machines("$.alarm"), store) == []
        [closed] = closed_episodes(store, 10)
        assert (closed.ref.episode_id, closed.ref.opened_at) == (opening.record_id, T0 + 1)
        assert closed.closed_at == closing.at


def test_an_alarm_saved_by_an_older_agent_finds_its_opening_event(tmp_path):
    machines = Machines("gw-1", SummaryConfig(window_s=60), AlarmsConfig(enter_after=1, leave_after=1), load(), {})
    with Store.open(tmp_path / "agent.db") as store:
        reading = stored(T0)
        opening = machines._event(reading, "ok", "alarm", T0)
        store.write([], [], [opening])
        older = {"state": "alarm", "direction": 0, "streak": 0, "target": 2, "shown": None, "candidate": None}
        [episode] = open_episodes({reading.machine_id: json.dumps(older)}, store)
        assert (episode.ref.episode_id, episode.ref.machine_id) == (opening.record_id, reading.machine_id)
