"""Alarm hysteresis: a machine hovering at a threshold does not flap; real changes become one event each."""

from __future__ import annotations

import pytest

from agent.alarms import Alarms
from sync.remote import AlarmsConfig

# Health bands of the shipped model's mapping: 70 at the warning threshold, 40 at the alarm threshold.
BANDS = (70.0, 40.0)


def run(readings, **config):
    alarms = Alarms(AlarmsConfig(**config))
    alarms.set_bands(*BANDS)
    return [alarms.update("m1", state, health) for state, health in readings]


def changes(readings, **config):
    return [c for c in run(readings, **config) if c]


OK, WARN, ALARM = ("ok", 90.0), ("warning", 60.0), ("alarm", 20.0)
HOVER_OK = ("ok", 72.0)  # back in ok, but within the 5-point margin of the warning band


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        ([WARN] * 2 + [OK] + [WARN] * 2, []),  # never 3 in a row
        ([WARN] * 3, [("ok", "warning")]),
        ([WARN, ALARM, ALARM], [("ok", "warning")]),  # the best state the streak shares
        ([ALARM] * 3, [("ok", "alarm")]),
        ([WARN] * 3 + [OK] * 4, [("ok", "warning")]),  # 4 < leave_after
        ([WARN] * 3 + [OK] * 5, [("ok", "warning"), ("warning", "ok")]),
        ([WARN] * 3 + [HOVER_OK] * 20, [("ok", "warning")]),  # inside the margin: stays in warning
        ([WARN] * 3 + [HOVER_OK, OK] * 10, [("ok", "warning")]),  # hovering at the threshold does not flap
        ([ALARM] * 3 + [WARN] * 5, [("ok", "alarm"), ("alarm", "warning")]),
        ([ALARM] * 3 + [WARN, OK, WARN, OK, WARN], [("ok", "alarm"), ("alarm", "warning")]),  # worst of the streak
        ([ALARM] * 3 + [("warning", 43.0)] * 9, [("ok", "alarm")]),  # 43 < 40 + 5: not safely out of alarm
    ],
)
def test_hysteresis(readings, expected):
    assert changes(readings) == expected


def test_thresholds_of_one_reading_each_way():
    assert changes([WARN, OK], enter_after=1, leave_after=1) == [("ok", "warning"), ("warning", "ok")]


def test_a_saved_alarm_is_every_field_of_the_machine_alarm():
    """MachineAlarm.to_json() is written by hand for speed: it must stay what dataclasses.asdict would give, so a
    field added later is saved too."""
    import dataclasses

    from agent.alarms import MachineAlarm, Shown

    alarms = Alarms(AlarmsConfig())
    alarms.set_bands(*BANDS)
    for state, health in [WARN] * 2:
        alarms.update("m1", state, health, Shown(health, 0.5, {"TWF": 0.1, "HDF": 0.4}))
    machine = alarms.machines["m1"]
    machine.episode, machine.episode_at = "e1", 12.5
    assert machine.to_json() == dataclasses.asdict(machine)
    assert MachineAlarm().to_json() == dataclasses.asdict(MachineAlarm())
    assert machine.candidate == {"health": 60.0, "p_failure": 0.5, "risk": {"TWF": 0.1, "HDF": 0.4}}
