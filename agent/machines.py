"""What the agent keeps per machine between readings: its alarm state and its open summary window.

The pipeline feeds every newly stored reading (never a redelivered one) and every rejection through `update()`,
which returns the outbox records (events, summaries) and the machine states to save in the same transaction as the
batch. `close_due()` closes windows by the clock when no reading does. Who calls it: only the pipeline thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.alarms import Alarms, MachineAlarm, Shown
from agent.store import MachineRecord, OutboxRecord, StoredReading
from agent.summaries import ShadowScore, Summariser, Window
from model.package import Model
from model.states import StateName
from sync.protocol import Event, ModelRef, Summary, event_id
from sync.remote import AlarmsConfig, SummaryConfig


class Machines:
    def __init__(self, gateway_id: str, summary: SummaryConfig, alarms: AlarmsConfig, model: Model,
                 saved: dict[str, str], started_at: float | None = None,
                 keep: Callable[[Summary], bool] | None = None) -> None:
        """`keep`: whether a closed window's summary goes to the outbox (summaries on change, sync/onchange.py)."""
        self.gateway_id = gateway_id
        self.keep = keep
        self.held_back = 0  # closed windows `keep` did not send, since the agent started
        # The alarms (MachineAlarm.to_json()) in the machine states of the last update() or close_due(): what the
        # pipeline hands to LatestReadings once they are committed.
        self.saved_alarms: dict[str, dict[str, Any]] = {}
        self.summaries = Summariser(summary.window_s, summary.grace_s)
        self.alarms = Alarms(alarms)
        self.use_model(model)
        for machine_id, text in saved.items():
            state = json.loads(text)
            self.alarms.machines[machine_id] = MachineAlarm(**state["alarm"])
            if state["window"] is not None:
                window = Window.from_json(state["window"])
                # The start counts as an arrival: readings queued at the broker while the agent was down are
                # still to come, and must not find their window closed by the clock before they arrive.
                window.arrived_at = max(window.arrived_at, time.time() if started_at is None else started_at)
                self.summaries.open[machine_id] = window
            if state.get("closed_until") is not None:
                self.summaries.closed_until[machine_id] = state["closed_until"]

    def use_model(self, model: Model) -> None:
        """The model whose thresholds and name go into what follows (on start and on a model reload)."""
        points = dict(model.manifest.health.points)
        thresholds = model.manifest.thresholds
        self.alarms.set_bands(points[thresholds.warning], points[thresholds.alarm])
        self.model = ModelRef(name=model.name, version=model.version, sha256=model.sha256,
                              package_digest=model.package_digest or None)

    def reconfigure(self, alarms: AlarmsConfig | None, summary: SummaryConfig | None) -> None:
        """Remote overrides (sync/remote.py): the hysteresis and the grace at once; the window size at the next
        start (a window in progress keeps its size)."""
        if alarms is not None:
            self.alarms.configure(alarms)
        if summary is not None:
            self.summaries.grace_s = summary.grace_s

    def update(self, readings: Sequence[StoredReading], rejected: Iterable[tuple[str | None, float]],
               now: float, shadow: tuple[ModelRef, dict[tuple[str, float], ShadowScore]] | None = None,
               ) -> tuple[list[OutboxRecord], list[MachineRecord]]:
        """New readings (in arrival order) and rejections (machine id, ts): the records to write with the batch.
        `shadow`: the candidate model and its score of each reading, keyed (machine id, ts)."""
        closed: list[Window] = []
        events: list[OutboxRecord] = []
        touched: set[str] = set()
        for reading in readings:
            closed += self.summaries.add(reading, now)
            if shadow is not None and self.summaries.last is not None:
                score = shadow[1].get((reading.machine_id, reading.ts))
                if score is not None:
                    self.summaries.last.add_shadow(shadow[0], reading.state, score)
            change = self.alarms.update(reading.machine_id, reading.state, reading.health,
                                        Shown(reading.health, reading.p_failure, reading.risk))
            if change is not None:
                events.append(self._event(reading, *change, now))
                self._episode(reading, *change, events[-1].record_id)
            touched.add(reading.machine_id)
        for machine_id, ts in rejected:
            self.summaries.add_rejected(machine_id, ts)
            if machine_id in self.summaries.open:
                touched.add(machine_id)
        closed += self.summaries.due(now)
        return self._records(events, closed, touched, now)

    def close_due(self, now: float) -> tuple[list[OutboxRecord], list[MachineRecord]]:
        closed = self.summaries.due(now)
        return self._records([], closed, {w.machine_id for w in closed}, now)

    def _records(self, events: list[OutboxRecord], closed: list[Window], touched: set[str],
                 now: float) -> tuple[list[OutboxRecord], list[MachineRecord]]:
        outbox = events + [record for window in closed if (record := self._summary(window, now)) is not None]
        touched |= {w.machine_id for w in closed}
        self.saved_alarms = {}
        return outbox, [self._saved(machine_id, now) for machine_id in sorted(touched)]

    def _event(self, reading: StoredReading, before: StateName, after: StateName, now: float) -> OutboxRecord:
        ts = datetime.fromtimestamp(reading.ts, UTC)
        event = Event(
            event_id=event_id(self.gateway_id, reading.machine_id, ts, after),
            machine_id=reading.machine_id, ts=ts, from_state=before, to_state=after,
            p_failure=reading.p_failure, health=reading.health,
            dominant_mode=max(reading.risk, key=reading.risk.__getitem__), mode_risk=reading.risk,
            reading=reading.values, model=self.model,
        )
        return OutboxRecord("event", str(event.event_id), reading.machine_id, reading.ts, event.model_dump_json(), now)

    def _episode(self, reading: StoredReading, before: StateName, after: StateName, event: str) -> None:
        """An alarm episode opens at the event out of ok and closes at the return to ok, as at central."""
        alarm = self.alarms.machines[reading.machine_id]
        if before == "ok":
            alarm.episode, alarm.episode_at = event, reading.ts
        elif after == "ok":
            alarm.episode = alarm.episode_at = None

    def _summary(self, window: Window, now: float) -> OutboxRecord | None:
        summary = window.summary(self.gateway_id, self.model)
        if self.keep is not None and not self.keep(summary):
            self.held_back += 1
            return None
        body = summary.model_dump_json(exclude={"shadow"} if summary.shadow is None else None)
        return OutboxRecord("summary", str(summary.summary_id), window.machine_id, window.start, body, now)

    def _saved(self, machine_id: str, now: float) -> MachineRecord:
        window = self.summaries.open.get(machine_id)
        alarm = self.saved_alarms[machine_id] = self.alarms.machines.get(machine_id, MachineAlarm()).to_json()
        state = {"alarm": alarm,
                 "window": window.to_json() if window else None,
                 "closed_until": self.summaries.closed_until.get(machine_id)}
        return MachineRecord(machine_id, json.dumps(state), now)
