"""Each machine's newest reading and trend kept in memory for the status API (agent/latest.py), on a real store: it
follows what is committed, keeps late readings out, and reads the store once after a start or a deletion."""

from __future__ import annotations

from pathlib import Path

from agent.latest import TREND_POINTS, LatestReadings
from agent.store import Store, StoredReading


def reading(machine_id: str, ts: float, health: float) -> StoredReading:
    return StoredReading(machine_id, ts, {"torque": 40.0}, "M", 0.01, {"HDF": 0.01}, health, "ok", (), "m@1", ts)


def trends(latest: LatestReadings, store: Store) -> dict[str, tuple[float, list[float]]]:
    return {r.machine_id: (r.ts, trend) for r, trend in latest.view(store)}


def test_it_reads_the_store_once_then_follows_the_commits(tmp_path: Path):
    with Store.open(tmp_path / "agent.db") as store:
        before = [reading("a", float(t), 50.0 + t) for t in range(TREND_POINTS + 5)] + [reading("b", 1.0, 90.04)]
        store.write(before, [])
        latest = LatestReadings()
        assert trends(latest, store) == {"a": (TREND_POINTS + 4.0, [50.0 + t for t in range(5, TREND_POINTS + 5)]),
                                         "b": (1.0, [90.0])}
        new = [reading("b", 2.0, 80.0), reading("c", 5.0, 70.0), reading("b", 0.5, 10.0)]  # the last one is late
        store.write(new, [])
        latest.committed(new)
        assert trends(latest, store)["b"] == (2.0, [90.0, 80.0]) and trends(latest, store)["c"] == (5.0, [70.0])


def test_after_a_deletion_it_reads_the_store_again(tmp_path: Path):
    with Store.open(tmp_path / "agent.db") as store:
        store.write([reading("a", 1.0, 50.0), reading("b", 100.0, 60.0)], [])
        latest = LatestReadings()
        assert set(trends(latest, store)) == {"a", "b"}
        store.delete_readings_before(50.0)
        latest.forget()
        assert trends(latest, store) == {"b": (100.0, [60.0])}


def test_the_saved_alarms_are_read_once_then_follow_the_commits(tmp_path: Path, caplog):
    """/api/v1/machines takes each machine's alarm from here, not from the machines table at every request."""
    import json

    from agent.store import MachineRecord

    def saved(state: str) -> dict:
        return {"state": state, "direction": 0, "streak": 0, "target": 0, "shown": None, "candidate": None,
                "episode": None, "episode_at": None}

    with Store.open(tmp_path / "agent.db") as store:
        store.write([reading("a", 1.0, 50.0), reading("b", 1.0, 60.0)], [], machines=[
            MachineRecord("a", json.dumps({"alarm": saved("warning"), "window": None}), 1.0),
            MachineRecord("b", "not json", 1.0)])
        latest = LatestReadings()
        assert latest.alarms(store) == {"a": saved("warning")}
        assert "machine b: saved state unreadable" in caplog.text
        store.write([reading("a", 2.0, 90.0)], [], machines=[
            MachineRecord("a", json.dumps({"alarm": saved("ok"), "window": None}), 2.0)])
        latest.committed([reading("a", 2.0, 90.0)], {"a": saved("ok")})
        assert latest.alarms(store) == {"a": saved("ok")}
        latest.forget()
        assert latest.alarms(store) == {"a": saved("ok")}  # as the store has it


def test_a_machine_changes_with_an_alarm_saved_without_a_reading(tmp_path: Path):
    """An alarm saved with no new reading (its window closed by the clock) is a change of the machine too: the
    status API, which encodes a machine again only when it changed, shows the alarm as saved."""
    with Store.open(tmp_path / "agent.db") as store:
        store.write([reading("a", 1.0, 50.0), reading("b", 1.0, 60.0)], [])
        latest = LatestReadings()
        before = {m.reading.machine_id: m for m in latest.machines(store)}
        assert latest.machines(store) is latest.machines(store)  # nothing changed: the same view
        alarm = {"state": "warning", "shown": None}
        latest.committed([], {"a": alarm})
        after = {m.reading.machine_id: m for m in latest.machines(store)}
        assert after["a"].alarm == alarm and after["a"].version != before["a"].version
        assert after["b"] is before["b"]  # unchanged: its view kept, its trend not copied again
        latest.committed([reading("b", 2.0, 70.0)])
        again = {m.reading.machine_id: m for m in latest.machines(store)}
        assert again["a"] is after["a"] and again["b"].trend == [60.0, 70.0] and after["b"].trend == [60.0]


def test_a_trend_keeps_its_points_exactly_outside_the_tenths_too(tmp_path: Path):
    # Trends are kept as tenths from 0 to 100 (2 bytes a point); any other health (a model mapping beyond 0-100,
    # NaN) turns the machine's trend into floats, and the status API shows the same numbers either way.
    healths = [0.0, 12.3, 100.0, 100.05, 150.25, -3.0, float("nan"), 42.42] + [55.5] * TREND_POINTS
    with Store.open(tmp_path / "agent.db") as store:
        latest = LatestReadings()
        trends(latest, store)  # an empty store: from now on, the commits
        for t, health in enumerate(healths[:8]):
            latest.committed([reading("a", float(t), health)])
        shown = trends(latest, store)["a"][1]
        assert repr(shown) == repr([0.0, 12.3, 100.0, 100.0, 150.2, -3.0, float("nan"), 42.4])
        latest.committed(reading("a", 8.0 + t, health) for t, health in enumerate(healths[8:]))
        assert trends(latest, store)["a"][1] == [55.5] * TREND_POINTS
