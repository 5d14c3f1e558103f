"""Alarm states with hysteresis: one small state machine per machine, fed every scored reading.

A machine enters a worse state after `enter_after` consecutive readings worse than its state (to the best state
those readings share), and leaves it after `leave_after` consecutive readings better than its state by at least
`leave_margin` health points (to the worst state those readings share). A machine hovering at a threshold
therefore does not flap. Each transition is an event.

What a technician sees of a machine is its state and the reading that holds it (`Shown`): the latest reading whose
own state is the machine's state. While the hysteresis holds a state the latest reading does not share (a few
readings into a change, or readings back in ok but not yet safely), the health and main risk shown stay those of
that reading, so health below the warning band always comes with warning or alarm, and never with ok.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.states import SEVERITY, STATES, StateName
from sync.remote import AlarmsConfig

Seen = dict[str, Any]  # a Shown as JSON


@dataclass(frozen=True, slots=True)
class Shown:
    """Of the reading that holds a machine's state: what the status API, the page and `pdm-edge status` show."""

    health: float
    p_failure: float
    risk: dict[str, float]

    def to_json(self) -> Seen:
        return {"health": self.health, "p_failure": self.p_failure, "risk": dict(self.risk)}


@dataclass(slots=True)
class MachineAlarm:
    state: StateName = "ok"
    direction: int = 0  # +1 a streak of worse readings, -1 of better ones, 0 none
    streak: int = 0
    target: int = 0  # the level the streak would move the machine to
    shown: Seen | None = None  # Shown of the latest reading whose own state is `state`
    candidate: Seen | None = None  # Shown of the streak's latest reading whose own state is `target`
    # The open alarm episode (SPEC §10), from the event out of ok to the return to ok: that event's id and time
    # (agent/machines.py sets them). None while ok, and for an episode opened by an agent older than episodes.
    episode: str | None = None
    episode_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        # Field by field rather than dataclasses.asdict, which deep-copies `shown` and `candidate` key by key: with a
        # machine saved per reading, asdict was the pipeline thread's largest cost (BENCHMARKS: ingest, status).
        return {"state": self.state, "direction": self.direction, "streak": self.streak, "target": self.target,
                "shown": self.shown, "candidate": self.candidate, "episode": self.episode,
                "episode_at": self.episode_at}


class Alarms:
    def __init__(self, config: AlarmsConfig) -> None:
        self._enter_after = config.enter_after
        self._leave_after = config.leave_after
        self._margin = config.leave_margin
        self._leave_ok = self._leave_warning = 0.0
        self._bands = (0.0, 0.0)
        self.machines: dict[str, MachineAlarm] = {}

    def configure(self, config: AlarmsConfig) -> None:
        """New hysteresis (a remote override): streaks in progress go on, counted against the new numbers."""
        self._enter_after, self._leave_after = config.enter_after, config.leave_after
        self._margin = config.leave_margin
        self.set_bands(*self._bands)

    def set_bands(self, health_at_warning: float, health_at_alarm: float) -> None:
        """The model's health at its warning and alarm thresholds: health at or above a band plus the margin is
        safely inside the better state."""
        self._bands = (health_at_warning, health_at_alarm)
        self._leave_ok = health_at_warning + self._margin
        self._leave_warning = health_at_alarm + self._margin

    def update(self, machine_id: str, state: str, health: float,
               shown: Shown | None = None) -> tuple[StateName, StateName] | None:
        """Feed one reading's state and health (and what to show of it); the (from, to) states when the machine
        changed state."""
        machine = self.machines.get(machine_id)
        if machine is None:
            machine = self.machines[machine_id] = MachineAlarm()
        seen = None if shown is None else shown.to_json()
        current, own = SEVERITY[machine.state], SEVERITY[state]
        if own > current:
            self._streak(machine, +1, own, min, own, seen)
            needed = self._enter_after
        else:
            level = 0 if health >= self._leave_ok else 1 if health >= self._leave_warning else 2
            if level >= current:
                machine.direction, machine.streak, machine.candidate = 0, 0, None
                machine.shown = seen if own == current and seen else machine.shown
                return None
            self._streak(machine, -1, level, max, own, seen)
            needed = self._leave_after
        if machine.streak < needed:
            return None
        before, machine.state = machine.state, STATES[machine.target].value
        machine.shown = machine.candidate or (seen and self._within_band(seen, machine.target))
        machine.direction, machine.streak, machine.candidate = 0, 0, None
        return before, machine.state

    def _streak(self, machine: MachineAlarm, direction: int, level: int, keep: Callable[[int, int], int], own: int,
                seen: Seen | None) -> None:
        if machine.direction != direction:
            machine.direction, machine.streak, machine.target, machine.candidate = direction, 0, level, None
        machine.streak += 1
        target = keep(machine.target, level)
        if target != machine.target:
            machine.target, machine.candidate = target, None
        if own == target and seen:
            machine.candidate = seen

    def _within_band(self, seen: Seen, level: int) -> Seen:
        """What to show when no reading of the streak shares the state it moved to (leaving alarm on readings
        already in ok, but within the margin): the latest, its health limited to that state's band."""
        health = within_band(seen["health"], level, self._leave_ok - self._margin, self._leave_warning - self._margin)
        return {**seen, "health": health}


def within_band(health: float, level: int, at_warning: float, at_alarm: float) -> float:
    """Health limited to the band of state STATES[level]: ok at or above at_warning, alarm at or below at_alarm."""
    low, high = ((at_warning, 100.0), (at_alarm, at_warning), (0.0, at_alarm))[level]
    return min(max(health, low), high)


def saved_alarm(text: object) -> Seen | None:
    """A machine's alarm as saved (the JSON of MachineAlarm.to_json(), or that JSON decoded); None when
    unreadable."""
    if isinstance(text, dict):
        return text
    try:
        alarm = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return alarm if isinstance(alarm, dict) else None


def technician_view(alarm: object, reading_state: str, latest: Shown, at_warning: float,
                    at_alarm: float) -> tuple[str, Shown]:
    """A machine's state and what to show with it, from its saved alarm (MachineAlarm.to_json(), None when not
    saved yet) and its latest reading: the reading that holds the state; without one saved (a machine new to the
    hysteresis, a state saved by an older agent), the latest reading, its health limited to the state's band."""
    saved = alarm if isinstance(alarm, dict) else {}
    state = saved["state"] if saved.get("state") in SEVERITY else reading_state
    held = saved.get("shown")
    if isinstance(held, dict):
        try:
            return state, Shown(float(held["health"]), float(held["p_failure"]), dict(held["risk"]))
        except (KeyError, TypeError, ValueError):
            pass  # unreadable: as if none was saved
    if state == reading_state:
        return state, latest
    return state, Shown(within_band(latest.health, SEVERITY[state], at_warning, at_alarm), latest.p_failure,
                        latest.risk)
