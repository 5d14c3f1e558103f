"""Summaries: one per machine and clock-aligned window, written with the batch that closed it, never twice."""

from __future__ import annotations

import json

from agent.config import PipelineConfig
from agent.machines import Machines
from agent.pipeline import Pipeline
from agent.store import Store, StoredReading
from agent.summaries import Summariser
from drivers.base import RawReading
from sync.protocol import Event, Summary
from sync.remote import AlarmsConfig, SummaryConfig

T0 = 1_790_000_080.0  # 40 s into a 60 s window


def stored(ts, machine="m1", health=90.0, p=0.01, state="ok", torque=40.0, ood=()):
    return StoredReading(machine, ts, {"torque": torque}, "M", p, {"TWF": p / 2, "OSF": p}, health, state, ood,
                         "x@1", ts)


def test_a_reading_in_a_later_window_closes_the_open_one_with_its_figures():
    summariser = Summariser(60, 10)
    assert summariser.add(stored(T0, torque=30.0, health=95.0), T0) == []
    assert summariser.add(stored(T0 + 10, torque=50.0, health=55.0, p=0.2, state="warning", ood=("torque",)),
                          T0 + 10) == []
    [window] = summariser.add(stored(T0 + 25), T0 + 25)  # the next window starts at T0 + 20
    assert (window.start, window.end, window.readings, window.out_of_distribution) == (T0 - 40, T0 + 20, 2, 1)
    assert (window.health_min, window.health_last, window.worst_state) == (55.0, 55.0, "warning")
    assert window.inputs == {"torque": [30.0, 80.0, 50.0]} and window.mode_risk_max == {"TWF": 0.1, "OSF": 0.2}
    assert list(summariser.open) == ["m1"] and summariser.open["m1"].start == T0 + 20


def test_a_reading_of_a_closed_window_is_late_and_in_no_summary():
    summariser = Summariser(60, 10)
    summariser.add(stored(T0), T0)
    summariser.add(stored(T0 + 30), T0 + 30)
    assert summariser.add(stored(T0 - 1), T0 + 31) == [] and summariser.late == 1
    assert summariser.open["m1"].readings == 1
    summariser.due(T0 + 200)
    assert summariser.add(stored(T0 + 31), T0 + 201) == [] and summariser.late == 2  # its window closed too
    assert summariser.open == {}


def test_the_clock_closes_a_quiet_window_after_the_grace_period():
    summariser = Summariser(60, 10)
    summariser.add(stored(T0), T0)
    assert summariser.due(T0 + 29.9) == []
    [window] = summariser.due(T0 + 30)
    assert window.readings == 1 and summariser.open == {}


def test_a_backlog_of_old_readings_is_summarised_by_its_own_timestamps():
    summariser = Summariser(60, 10)
    now = T0 + 86_400  # a day later, after an outage
    summariser.add(stored(T0), now)
    assert summariser.due(now + 9.9) == []  # its last reading arrived just now: more may follow
    summariser.add(stored(T0 + 5), now + 9.9)
    [window] = summariser.due(now + 20)
    assert window.readings == 2


def raw(ts, machine="m1", **values):
    fields = {"machine_type": "M", "air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500,
              "torque": 40.0, "tool_wear": 10, **values}
    return RawReading(machine, ts, fields, "test", ts, payload="{}")


def agent_pipeline(scorer, store, now):
    machines = Machines("gw-1", SummaryConfig(window_s=60, grace_s=10), AlarmsConfig(), scorer.model,
                        store.machines(), started_at=now[0])
    return Pipeline(scorer, store, PipelineConfig(), machines, clock=lambda: now[0])


def test_summaries_and_events_survive_restarts_and_redeliveries_exactly_once(scorer, tmp_path):
    now = [T0]
    path = tmp_path / "agent.db"
    stream = [raw(T0 + i, machine=f"m{i % 2}") for i in range(100)]  # two machines over three windows
    stream[40:46] = [raw(T0 + 40 + k, machine="m0", torque=68.0, rotational_speed=1400) for k in range(6)]  # PWF
    for cut in (0, 37, 70):  # a restart after each cut; every restart redelivers the 10 readings before the cut
        with Store.open(path) as store:
            pipeline = agent_pipeline(scorer, store, now)
            pipeline.start()
            for reading in stream[max(0, cut - 10):{0: 37, 37: 70, 70: 100}[cut]]:
                pipeline.put(reading)
            assert pipeline.stop(timeout=30)
    now[0] = T0 + 200
    with Store.open(path) as store:
        pipeline = agent_pipeline(scorer, store, now)
        now[0] += 20  # the clock closes the last windows, grace_s after the restart
        pipeline.start()
        assert pipeline.stop(timeout=30)
        summaries = [Summary.model_validate_json(r.body) for r in store.outbox("summary")]
        events = [Event.model_validate_json(r.body) for r in store.outbox("event")]
    by_window = {(s.machine_id, s.window_start.timestamp()): s.readings for s in summaries}
    expected = {}
    for i in range(100):
        start = (T0 + i) // 60 * 60
        key = (f"m{i % 2}" if not 40 <= i < 46 else "m0", start)
        expected[key] = expected.get(key, 0) + 1
    assert by_window == expected
    assert len({s.summary_id for s in summaries}) == len(summaries)
    assert [(e.machine_id, e.from_state, e.to_state, e.dominant_mode) for e in events] == [
        ("m0", "ok", "alarm", "PWF"), ("m0", "alarm", "ok", "TWF")]
    assert all(json.loads(e.model_dump_json())["reading"]["torque"] for e in events)


def test_an_open_window_restored_after_downtime_waits_for_the_readings_still_queued(scorer, tmp_path):
    path = tmp_path / "agent.db"
    with Store.open(path) as store:
        pipeline = agent_pipeline(scorer, store, [T0])
        pipeline.start()
        pipeline.put(raw(T0))
        assert pipeline.stop(timeout=30)
        saved = store.machines()
    later = T0 + 3600  # an hour of downtime: far past the window's end and grace
    machines = Machines("gw-1", SummaryConfig(window_s=60, grace_s=10), AlarmsConfig(), scorer.model, saved,
                        started_at=later)
    assert machines.close_due(later + 5)[0] == []  # the broker's backlog is still arriving
    outbox, _ = machines.update([stored(T0 + 1)], [], later + 6)
    assert outbox == []
    [summary] = [json.loads(r.body) for r in machines.close_due(later + 17)[0]]
    assert summary["readings"] == 2
