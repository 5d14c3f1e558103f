"""/api/v1/machines, /api/v1/machines/{id} and /api/v1/events from an `AgentSnapshot`: each machine's latest reading
and alarm state as the technician sees them (agent/alarms.py), its inputs against the model's ranges, its history
and its alarm transitions."""

from __future__ import annotations

import logging
from datetime import datetime
from functools import cache
from typing import Any

from agent.alarms import Shown, saved_alarm, technician_view
from agent.latest import TREND_POINTS
from agent.roster import heard
from agent.snapshot import AgentSnapshot, Records
from agent.status.gateway import at
from agent.status.guard import ApiError
from agent.status.models import EventInfo, HistoryPoint, InputValue, MachineDetail, MachineInfo, ModeRisk
from agent.store import StoredReading
from model.modes import mode_words
from model.package import Model
from model.states import SEVERITY
from sync.protocol import Event

log = logging.getLogger("agent.status")

MACHINE_EVENTS = 20


def machine_infos(snap: AgentSnapshot) -> list[MachineInfo]:
    """Every machine with its latest reading, alarm state and trend, the worst first (the page's and `pdm-edge demo`'s
    list)."""
    model, alarms, now = snap.model, snap.latest.alarms(snap.records), snap.taken_at
    forget_after_h, bands = snap.config.machines.forget_after_h, health_bands(model)
    machines = [MachineInfo(**machine_fields(reading, alarms.get(reading.machine_id), model, now, trend, bands))
                for reading, trend in snap.latest.view(snap.records) if heard(reading, forget_after_h, now)]
    machines.sort(key=lambda m: (-SEVERITY.get(m.state, 0), m.machine_id))
    return machines


def machine_detail(snap: AgentSnapshot, machine_id: str, history: int) -> MachineDetail:
    readings = snap.records.history(machine_id, 0.0, history)
    if not readings:
        raise ApiError(404, "not_found", f"no machine {machine_id!r} on this gateway (none of its readings is stored)")
    latest = readings[-1]
    model = snap.model
    inputs = [
        InputValue(name=i.name, unit=i.unit, description=i.description, value=latest.values.get(i.name),
                   training_min=i.training_range.min, training_max=i.training_range.max,
                   physical_min=i.physical_range.min, physical_max=i.physical_range.max, ood=i.name in latest.ood)
        for i in model.manifest.inputs
    ]
    fields = machine_fields(latest, _alarm(snap, machine_id), model, snap.taken_at,
                             [r.health for r in readings[-TREND_POINTS:]], health_bands(model))
    return MachineDetail(
        **fields, inputs=inputs, modes=[mode_risk(mode, risk, model) for mode, risk in fields["risk"].items()],
        history=[HistoryPoint(ts=at(r.ts), health=r.health, p_failure=r.p_failure, state=r.state) for r in readings],
        events=event_infos(snap.records, machine_id, None, MACHINE_EVENTS),
    )


def event_infos(records: Records, machine_id: str | None, since: datetime | None, limit: int) -> list[EventInfo]:
    """Newest first (by the time of the reading that caused them). `since` is compared at the microsecond
    resolution the API shows times in, so an event's own `ts` passed back as `since` finds it: the store is asked
    from a microsecond earlier and the few in between, the oldest of the answer, are dropped here."""
    found = records.events(machine_id, None if since is None else since.timestamp() - 1e-6, limit)
    listed = []
    for record, synced in found:
        if since is not None and at(record.at) < since:
            continue
        try:
            event = Event.model_validate_json(record.body)
        except ValueError as exc:
            log.warning("outbox event %s unreadable: %s", record.record_id, exc)
            continue
        listed.append(EventInfo(
            event_id=str(event.event_id), machine_id=event.machine_id, ts=event.ts, from_state=event.from_state,
            to_state=event.to_state, health=event.health, p_failure=event.p_failure,
            dominant_mode=event.dominant_mode, dominant_label=mode_words(event.dominant_mode)["label"],
            mode_risk=event.mode_risk, reading=event.reading,
            model_version=f"{event.model.name}@{event.model.version}", synced=synced,
        ))
    return listed


def mode_risk(mode: str, risk: float, model: Model) -> ModeRisk:
    return ModeRisk(**mode_risk_fields(mode, risk, model))


def mode_risk_fields(mode: str, risk: float, model: Model) -> dict[str, Any]:
    """ModeRisk's fields, in its order."""
    label, meaning, advice = _words(mode)
    threshold = model.manifest.thresholds.modes.get(mode)
    return {"mode": mode, "label": label, "meaning": meaning, "advice": advice, "risk": risk, "threshold": threshold,
            "elevated": threshold is not None and risk >= threshold}


@cache  # a model's few modes: once each rather than once per machine and request
def _words(mode: str) -> tuple[str, str, str]:
    words = mode_words(mode)
    return words["label"], words["meaning"], words["advice"]


def _alarm(snap: AgentSnapshot, machine_id: str) -> dict[str, Any] | None:
    """One machine's saved alarm: only its own is read and decoded."""
    saved = snap.saved_alarms_of(machine_id)
    alarm = saved_alarm(saved.get(machine_id))
    if alarm is None and machine_id in saved:
        log.warning("machine %s: saved state unreadable", machine_id)
    return alarm


def health_bands(model: Model) -> tuple[float, float]:
    """The model's health at its warning and at its alarm threshold."""
    points = dict(model.manifest.health.points)
    thresholds = model.manifest.thresholds
    return points[thresholds.warning], points[thresholds.alarm]


def machine_fields(reading: StoredReading, alarm: dict[str, Any] | None, model: Model, now: float,
                    trend: list[float], bands: tuple[float, float]) -> dict[str, Any]:
    """MachineInfo's fields: the state and the reading that holds it (agent/alarms.py), against the model (`bands`:
    `health_bands(model)`, worked out once per request rather than once per machine)."""
    return {**row_fields(reading, alarm, model, trend, bands), "last_reading_age_s": age_s(reading, now)}


def row_fields(reading: StoredReading, alarm: dict[str, Any] | None, model: Model, trend: list[float],
               bands: tuple[float, float]) -> dict[str, Any]:
    """MachineInfo's fields but `last_reading_age_s`, in MachineInfo's order; `dominant` as ModeRisk's fields."""
    state, shown = technician_view(alarm, reading.state, Shown(reading.health, reading.p_failure, reading.risk),
                                   *bands)
    risk = shown.risk
    dominant = max(risk, key=risk.__getitem__) if risk else None
    return {
        "machine_id": reading.machine_id, "machine_type": reading.machine_type, "state": state,
        "reading_state": reading.state, "health": shown.health, "reading_health": reading.health,
        "p_failure": shown.p_failure,
        "dominant": mode_risk_fields(dominant, risk[dominant], model) if dominant else None, "risk": risk,
        "ood": list(reading.ood), "values": reading.values, "last_reading_at": at(reading.ts),
        "last_received_at": at(reading.received_at), "model_version": reading.model_version, "trend": trend,
    }


def age_s(reading: StoredReading, now: float) -> float:
    """Since the reading was received, to the millisecond."""
    return round(max(0.0, now - reading.received_at), 3)
