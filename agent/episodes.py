"""The open alarm episodes of this gateway's machines (SPEC §10), as central's episodes hold them: a machine's episode
opens at its event out of ok, follows it to alarm and closes at its return to ok. Each is named by its opening event
(agent/actions.py, central/gateway_actions.py).

Read from each machine's saved alarm (agent/alarms.py's MachineAlarm: `episode`, `episode_at`); a machine out of ok
whose alarm was saved by an agent older than episodes has its opening event looked up among its recent events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.actions import EpisodeRef
from agent.alarms import saved_alarm
from agent.store import OutboxRecord
from model.states import SEVERITY, StateName

log = logging.getLogger(__name__)

LOOKBACK_EVENTS = 50  # of a machine, for the opening event an older agent did not save
CLOSED_LOOKBACK_EVENTS = 2_000  # of all machines, newest first: where recently closed episodes are found


class Events(Protocol):
    def events(self, machine_id: str | None = None, since: float | None = None,
               limit: int = 100) -> list[tuple[OutboxRecord, bool]]: ...


@dataclass(frozen=True, slots=True)
class OpenEpisode:
    ref: EpisodeRef
    state: StateName  # the machine's state now: warning or alarm


@dataclass(frozen=True, slots=True)
class ClosedEpisode:
    ref: EpisodeRef
    closed_at: float  # the return to ok: that event's ts


def closed_episodes(events: Events, limit: int) -> list[ClosedEpisode]:
    """Episodes that closed among the gateway's newest events (the outbox keeps them `synced_retention_h` after
    central has them), the latest closed first: what a technician may still label after the repair."""
    opened: dict[str, OutboxRecord] = {}
    found: list[ClosedEpisode] = []
    for record, _ in reversed(events.events(limit=CLOSED_LOOKBACK_EVENTS)):  # oldest first
        try:
            event = json.loads(record.body)
            from_state, to_state = event["from_state"], event["to_state"]
        except (ValueError, KeyError, TypeError):
            continue
        if from_state == "ok" and to_state != "ok":
            opened[record.machine_id] = record
        elif to_state == "ok" and (start := opened.pop(record.machine_id, None)) is not None:
            found.append(ClosedEpisode(EpisodeRef(start.record_id, start.machine_id, start.at), record.at))
    found.sort(key=lambda e: (-e.closed_at, e.ref.machine_id))
    return found[:limit]


def open_episodes(saved: Mapping[str, object], events: Events) -> list[OpenEpisode]:
    """Each machine out of ok with its episode, the worst first, then the oldest."""
    found = []
    for machine_id, text in saved.items():
        alarm = saved_alarm(text)
        if alarm is None or alarm.get("state") not in SEVERITY or alarm["state"] == "ok":
            continue
        episode, opened_at = alarm.get("episode"), alarm.get("episode_at")
        if isinstance(episode, str) and isinstance(opened_at, int | float):
            ref: EpisodeRef | None = EpisodeRef(episode, machine_id, float(opened_at))
        else:
            ref = _opening_event(events, machine_id)
        if ref is None:
            log.debug("machine %s: out of ok, its opening event no longer kept", machine_id)
            continue
        found.append(OpenEpisode(ref, alarm["state"]))
    found.sort(key=lambda e: (-SEVERITY[e.state], e.ref.opened_at, e.ref.machine_id))
    return found


def _opening_event(events: Events, machine_id: str) -> EpisodeRef | None:
    for record, _ in events.events(machine_id, limit=LOOKBACK_EVENTS):  # newest first
        try:
            opened = json.loads(record.body)["from_state"] == "ok"
        except (ValueError, KeyError, TypeError):
            continue
        if opened:
            return EpisodeRef(record.record_id, machine_id, record.at)
    return None
