"""What the agent keeps per machine between readings: its alarm state and its open summary window.

The pipeline feeds every newly stored reading (never a redelivered one) and every rejection through `update()`,
which returns the outbox records (events, summaries) and the machine states to save in the same transaction as the
batch. `close_due()` closes windows by the clock when no reading does. Who calls it: only the pipeline thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from agent.alarms import Alarms, MachineAlarm, Shown
from agent.config import AlarmsConfig, SummaryConfig
from agent.store import MachineRecord, OutboxRecord, StoredReading
from agent.summaries import Summariser, Window
from model.package import Model
from sync.protocol import Event, ModelRef, event_id


class Machines:
    def __init__(self, gateway_id: str, summary: SummaryConfig, alarms: AlarmsConfig, model: Model,
                 saved: dict[str, str], started_at: float | None = None) -> None:
        self.gateway_id = gateway_id
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

    def update(self, readings: Sequence[StoredReading], rejected: Iterable[tuple[str | None, float]],
               now: float) -> tuple[list[OutboxRecord], list[MachineRecord]]:
        """New readings (in arrival order) and rejections (machine id, ts): the records to write with the batch."""
        closed: list[Window] = []
        events: list[OutboxRecord] = []
        touched: set[str] = set()
        for reading in readings:
            closed += self.summaries.add(reading, now)
            change = self.alarms.update(reading.machine_id, reading.state, reading.health,
                                        Shown(reading.health, reading.p_failure, reading.risk))
            if change is not None:
                events.append(self._event(reading, *change, now))
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

    def _records(self, events, closed, touched, now):
        outbox = events + [self._summary(window, now) for window in closed]
        touched |= {w.machine_id for w in closed}
        return outbox, [self._saved(machine_id, now) for machine_id in sorted(touched)]

    def _event(self, reading: StoredReading, before: str, after: str, now: float) -> OutboxRecord:
        ts = datetime.fromtimestamp(reading.ts, UTC)
        event = Event(
            event_id=event_id(self.gateway_id, reading.machine_id, ts, after),
            machine_id=reading.machine_id, ts=ts, from_state=before, to_state=after,
            p_failure=reading.p_failure, health=reading.health,
            dominant_mode=max(reading.risk, key=reading.risk.__getitem__), mode_risk=reading.risk,
            reading=reading.values, model=self.model,
        )
        return OutboxRecord("event", str(event.event_id), reading.machine_id, reading.ts, event.model_dump_json(), now)

    def _summary(self, window: Window, now: float) -> OutboxRecord:
        summary = window.summary(self.gateway_id, self.model)
        return OutboxRecord("summary", str(summary.summary_id), window.machine_id, window.start,
                            summary.model_dump_json(), now)

    def _saved(self, machine_id: str, now: float) -> MachineRecord:
        window = self.summaries.open.get(machine_id)
        state = {"alarm": self.alarms.machines.get(machine_id, MachineAlarm()).to_json(),
                 "window": window.to_json() if window else None,
                 "closed_until": self.summaries.closed_until.get(machine_id)}
        return MachineRecord(machine_id, json.dumps(state), now)
