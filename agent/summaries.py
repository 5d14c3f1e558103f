"""Per-machine health summaries over clock-aligned windows.

Each machine has at most one open window, the one of its newest reading. A reading in a later window closes it; so
does the clock, `grace_s` after both the window's end and the arrival of its last reading (so a backlog of old
readings, delivered after an outage, is summarised by its own timestamps rather than cut at the first batch). A
closed window becomes a Summary, which the pipeline writes to the outbox in the same transaction as the batch that
closed it; the open windows are saved in that transaction too, so a crash neither loses nor repeats a window.

A reading of a window that already closed is stored and scored (and feeds the alarms) but is in no summary; such
readings are counted as `late`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from agent.store import StoredReading
from model.states import SEVERITY, StateName
from sync.protocol import ModelRef, ShadowFigures, Spread, Summary, summary_id

SEVERITY_WARNING, SEVERITY_ALARM = SEVERITY["warning"], SEVERITY["alarm"]


@dataclass(frozen=True, slots=True)
class ShadowScore:
    """One reading as the shadow (candidate) model scored it."""

    state: StateName | None  # None: the candidate's validation rejected the reading
    ood: bool
    seconds: float  # the reading's share of the candidate's scoring time


@dataclass(slots=True)
class Window:
    machine_id: str
    start: float
    end: float
    readings: int = 0
    rejected: int = 0
    out_of_distribution: int = 0
    health_min: float = math.inf
    health_sum: float = 0.0
    health_last: float = 0.0
    p_failure_max: float = 0.0
    p_failure_sum: float = 0.0
    mode_risk_max: dict[str, float] = field(default_factory=dict)
    worst_state: StateName = "ok"
    inputs: dict[str, list[float]] = field(default_factory=dict)  # name -> [min, sum, max]
    arrived_at: float = 0.0  # when its last reading arrived (wall clock)
    # The candidate scored in shadow (SPEC §9): its ModelRef as JSON, and counts over this window's readings
    # [readings, agreed, live_warning, live_alarm, warning, alarm, out_of_distribution]; reset when it changes.
    shadow_model: dict[str, Any] | None = None
    shadow_counts: list[int] = field(default_factory=lambda: [0] * 7)
    shadow_s: float = 0.0

    def add_shadow(self, model: ModelRef, live_state: str, score: ShadowScore) -> None:
        ref = model.model_dump()
        if self.shadow_model != ref:
            self.shadow_model, self.shadow_counts, self.shadow_s = ref, [0] * 7, 0.0
        counts, own = self.shadow_counts, SEVERITY.get(score.state or "", -1)
        live = SEVERITY[live_state]
        counts[0] += 1
        counts[1] += own == live
        counts[2] += live == SEVERITY_WARNING
        counts[3] += live == SEVERITY_ALARM
        counts[4] += own == SEVERITY_WARNING
        counts[5] += own == SEVERITY_ALARM
        counts[6] += score.ood
        self.shadow_s += score.seconds

    def add(self, reading: StoredReading, now: float) -> None:
        # Once per reading: comparisons rather than min() and max() calls, the same results.
        self.arrived_at = now
        self.readings += 1
        if reading.ood:
            self.out_of_distribution += 1
        health, p_failure = reading.health, reading.p_failure
        if health < self.health_min:  # noqa: PLR1730
            self.health_min = health
        self.health_sum += health
        self.health_last = health
        if p_failure > self.p_failure_max:  # noqa: PLR1730
            self.p_failure_max = p_failure
        self.p_failure_sum += p_failure
        risk_max = self.mode_risk_max
        for mode, risk in reading.risk.items():
            highest = risk_max.get(mode)
            if highest is None:
                risk_max[mode] = max(0.0, risk)
            elif risk > highest:
                risk_max[mode] = risk
        if reading.state != self.worst_state and SEVERITY[reading.state] > SEVERITY[self.worst_state]:
            self.worst_state = cast(StateName, reading.state)  # a state: SEVERITY has it
        inputs = self.inputs
        for name, value in reading.values.items():
            spread = inputs.get(name)
            if spread is None:
                inputs[name] = [value, value, value]
                continue
            if value < spread[0]:
                spread[0] = value
            elif value > spread[2]:
                spread[2] = value
            spread[1] += value

    def summary(self, gateway_id: str, model: ModelRef) -> Summary:
        start = datetime.fromtimestamp(self.start, UTC)
        n = self.readings
        return Summary(
            summary_id=summary_id(gateway_id, self.machine_id, start),
            machine_id=self.machine_id,
            window_start=start,
            window_end=datetime.fromtimestamp(self.end, UTC),
            model=model,
            readings=n,
            rejected=self.rejected,
            out_of_distribution=self.out_of_distribution,
            health_min=self.health_min,
            health_mean=round(self.health_sum / n, 3),
            health_last=self.health_last,
            p_failure_max=self.p_failure_max,
            p_failure_mean=min(1.0, self.p_failure_sum / n),
            mode_risk_max=self.mode_risk_max,
            worst_state=self.worst_state,
            inputs={name: Spread(min=lo, mean=total / n, max=hi) for name, (lo, total, hi) in self.inputs.items()},
            shadow=self._shadow_figures(),
        )

    def _shadow_figures(self) -> ShadowFigures | None:
        if self.shadow_model is None or not self.shadow_counts[0]:
            return None
        readings, agreed, live_warning, live_alarm, warning, alarm, ood = self.shadow_counts
        return ShadowFigures(model=ModelRef.model_validate(self.shadow_model), readings=readings, agreed=agreed,
                             live_warning=live_warning, live_alarm=live_alarm, warning=warning, alarm=alarm,
                             out_of_distribution=ood, score_s=round(self.shadow_s, 6))

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Window:
        return cls(**data)


class Summariser:
    def __init__(self, window_s: float, grace_s: float) -> None:
        self.window_s = window_s
        self.grace_s = grace_s
        self.open: dict[str, Window] = {}
        self.closed_until: dict[str, float] = {}  # per machine: the end of its last closed window
        self.late = 0
        self.last: Window | None = None  # the window the last add() counted its reading in (None: late)

    def add(self, reading: StoredReading, now: float) -> list[Window]:
        """Count a reading into its machine's window; the window it closed, if any."""
        self.last = None
        machine_id = reading.machine_id
        start = math.floor(reading.ts / self.window_s) * self.window_s
        window = self.open.get(machine_id)
        if start < self.closed_until.get(machine_id, -math.inf) or (window is not None and start < window.start):
            self.late += 1
            return []
        closed = []
        if window is None or start > window.start:
            if window is not None:
                closed.append(self._close(window))
            window = self.open[machine_id] = Window(machine_id, start, start + self.window_s)
        window.add(reading, now)
        self.last = window
        return closed

    def add_rejected(self, machine_id: str | None, ts: float) -> None:
        window = self.open.get(machine_id) if machine_id else None
        if window is not None and window.start <= ts < window.end:
            window.rejected += 1

    def due(self, now: float) -> list[Window]:
        """Close the windows whose end and last reading are both more than grace_s ago."""
        due = [w for w in self.open.values() if max(w.end, w.arrived_at) + self.grace_s <= now]
        return [self._close(self.open.pop(w.machine_id)) for w in due]

    def _close(self, window: Window) -> Window:
        self.closed_until[window.machine_id] = window.end
        return window
