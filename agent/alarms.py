"""Alarm states with hysteresis: one small state machine per machine, fed every scored reading.

A machine enters a worse state after `enter_after` consecutive readings worse than its state (to the best state
those readings share), and leaves it after `leave_after` consecutive readings better than its state by at least
`leave_margin` health points (to the worst state those readings share). A machine hovering at a threshold
therefore does not flap. Each transition is an event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from agent.config import AlarmsConfig

LEVELS = ("ok", "warning", "alarm")


@dataclass(slots=True)
class MachineAlarm:
    state: str = "ok"
    direction: int = 0  # +1 a streak of worse readings, -1 of better ones, 0 none
    streak: int = 0
    target: int = 0  # the level the streak would move the machine to

    def to_json(self) -> dict:
        return asdict(self)


class Alarms:
    def __init__(self, config: AlarmsConfig) -> None:
        self._enter_after = config.enter_after
        self._leave_after = config.leave_after
        self._margin = config.leave_margin
        self._leave_ok = self._leave_warning = 0.0
        self.machines: dict[str, MachineAlarm] = {}

    def set_bands(self, health_at_warning: float, health_at_alarm: float) -> None:
        """The model's health at its warning and alarm thresholds: health at or above a band plus the margin is
        safely inside the better state."""
        self._leave_ok = health_at_warning + self._margin
        self._leave_warning = health_at_alarm + self._margin

    def update(self, machine_id: str, state: str, health: float) -> tuple[str, str] | None:
        """Feed one reading's state and health; the (from, to) states when the machine changed state."""
        machine = self.machines.setdefault(machine_id, MachineAlarm())
        current, level = LEVELS.index(machine.state), LEVELS.index(state)
        if level > current:
            self._streak(machine, +1, level, min)
            needed = self._enter_after
        else:
            level = 0 if health >= self._leave_ok else 1 if health >= self._leave_warning else 2
            if level >= current:
                machine.direction, machine.streak = 0, 0
                return None
            self._streak(machine, -1, level, max)
            needed = self._leave_after
        if machine.streak < needed:
            return None
        before = machine.state
        machine.state, machine.direction, machine.streak = LEVELS[machine.target], 0, 0
        return before, machine.state

    @staticmethod
    def _streak(machine: MachineAlarm, direction: int, level: int, keep) -> None:
        if machine.direction != direction:
            machine.direction, machine.streak, machine.target = direction, 0, level
        machine.streak += 1
        machine.target = keep(machine.target, level)
