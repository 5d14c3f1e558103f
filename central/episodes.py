"""Alarm episodes from events (SPEC §10), kept in the ingest transaction.

An episode opens at a machine's first event out of ok, follows it to alarm and closes at its return to ok. Episodes
are a function of the machine's stored events ordered by their time, whatever order they arrived in: for each
machine with newly stored events, the stretch from the episode containing the earliest new event onwards is
segmented again and matched to the stored episodes (a stored episode overlapping a segment keeps its id, so
acknowledgements and labels stay with it; a late event that joins two episodes keeps the first and points the other
at it). The changes are the episode's transitions: `opened`, `to_alarm`, `closed`, each once, because the rebuild
only reports what changed against the stored rows. Only newly stored events trigger a rebuild (a re-sent event is a
duplicate, not stored, and changes nothing); the machine's rows are serialised by an advisory lock taken in machine
order, so concurrent batches cannot deadlock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from model.states import SEVERITY


@dataclass(frozen=True)
class Transition:
    """One change of an episode worth telling someone about."""

    episode_id: int
    kind: str  # opened, to_alarm, closed, escalation
    gateway: str
    machine_id: str
    at: datetime
    state: str  # the machine's state the transition went to: opened -> warning|alarm, to_alarm, closed -> ok
    peak_state: str
    opened_at: datetime
    closed_at: datetime | None
    dominant_mode: str
    p_failure_max: float

    def document(self) -> dict[str, Any]:
        return {"transition": self.kind, "at": self.at.isoformat(), "episode": {
            "id": self.episode_id, "gateway": self.gateway, "machine_id": self.machine_id, "state": self.state,
            "peak_state": self.peak_state, "opened_at": self.opened_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "dominant_mode": self.dominant_mode, "p_failure_max": self.p_failure_max}}


@dataclass
class _Segment:
    opened_at: datetime
    first_state: str
    state: str
    peak_state: str
    dominant_mode: str
    p_failure_max: float
    events: int = 0
    closed_at: datetime | None = None
    to_alarm_at: datetime | None = None

    def add(self, ts: datetime, to_state: str, p_failure: float, mode: str) -> None:
        self.events += 1
        if to_state == "ok":
            self.closed_at = ts
            return
        self.state = to_state
        if SEVERITY[to_state] > SEVERITY[self.peak_state]:
            self.peak_state, self.to_alarm_at = to_state, ts
        if p_failure > self.p_failure_max:
            self.p_failure_max, self.dominant_mode = p_failure, mode


@dataclass
class _Stored:
    id: int
    opened_at: datetime
    closed_at: datetime | None
    peak_state: str
    matched: bool = field(default=False)

    def overlaps(self, segment: _Segment) -> bool:
        return ((segment.closed_at is None or self.opened_at <= segment.closed_at)
                and (self.closed_at is None or self.closed_at >= segment.opened_at))


NEW_EVENTS_BY_MACHINE = """
SELECT machine_id, min(ts) FROM events WHERE gateway_id = %s AND event_id = ANY(%s)
GROUP BY machine_id ORDER BY machine_id
"""
START = """
SELECT least(%(since)s, (
    SELECT opened_at FROM alarm_episodes
    WHERE gateway_id = %(gw)s AND machine_id = %(machine)s AND merged_into IS NULL AND opened_at <= %(since)s
      AND (closed_at IS NULL OR closed_at >= %(since)s)
    ORDER BY opened_at DESC LIMIT 1))
"""
EVENTS = """
SELECT ts, to_state, p_failure, dominant_mode FROM events
WHERE gateway_id = %(gw)s AND machine_id = %(machine)s AND ts >= %(start)s ORDER BY ts, event_id
"""
STORED = """
SELECT id, opened_at, closed_at, peak_state FROM alarm_episodes
WHERE gateway_id = %(gw)s AND machine_id = %(machine)s AND merged_into IS NULL
  AND (closed_at IS NULL OR closed_at >= %(start)s)
ORDER BY opened_at, id
"""
INSERT = """
INSERT INTO alarm_episodes (gateway_id, machine_id, opened_at, closed_at, state, peak_state, dominant_mode,
                            p_failure_max, events, noticed_at)
VALUES (%(gw)s, %(machine)s, %(opened_at)s, %(closed_at)s, %(state)s, %(peak_state)s, %(dominant_mode)s,
        %(p_failure_max)s, %(events)s, %(now)s)
RETURNING id
"""
UPDATE = """
UPDATE alarm_episodes SET opened_at = %(opened_at)s, closed_at = %(closed_at)s, state = %(state)s,
    peak_state = %(peak_state)s, dominant_mode = %(dominant_mode)s, p_failure_max = %(p_failure_max)s,
    events = %(events)s, updated_at = now()
WHERE id = %(id)s
"""


async def apply(conn: psycopg.AsyncConnection[Any], gateway_id: int, gateway: str, event_ids: list[uuid.UUID],
                now: datetime) -> list[Transition]:
    """Bring the episodes of the machines these newly stored events belong to up to date; their transitions.
    Call inside the transaction that stored the events; `now` is central's time (a new episode's noticed_at)."""
    if not event_ids:
        return []
    machines = await (await conn.execute(NEW_EVENTS_BY_MACHINE, [gateway_id, event_ids])).fetchall()
    transitions: list[Transition] = []
    for machine_id, since in machines:
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [gateway_id, machine_id])
        transitions += await _rebuild(conn, gateway_id, gateway, machine_id, since, now)
    return transitions


def segments(rows: list[tuple[datetime, str, float, str]]) -> list[_Segment]:
    """Events in time order -> episodes: from the first event out of ok to the next return to ok."""
    found: list[_Segment] = []
    current: _Segment | None = None
    for ts, to_state, p_failure, mode in rows:
        if current is None:
            if to_state == "ok":
                continue  # already ok: nothing to close
            current = _Segment(ts, to_state, to_state, to_state, mode, p_failure)
        current.add(ts, to_state, p_failure, mode)
        if current.closed_at is not None:
            found.append(current)
            current = None
    if current is not None:
        found.append(current)
    return found


async def _rebuild(conn: psycopg.AsyncConnection[Any], gateway_id: int, gateway: str, machine_id: str,
                   since: datetime, now: datetime) -> list[Transition]:
    key = {"gw": gateway_id, "machine": machine_id, "since": since}
    start = (await (await conn.execute(START, key)).fetchone() or [since])[0]
    key["start"] = start
    rows = await (await conn.execute(EVENTS, key)).fetchall()
    stored = [_Stored(*row) for row in await (await conn.execute(STORED, key)).fetchall()]
    transitions: list[Transition] = []
    for segment in segments(rows):
        overlapping = [s for s in stored if not s.matched and s.overlaps(segment)]
        values = {"gw": gateway_id, "machine": machine_id, "opened_at": segment.opened_at,
                  "closed_at": segment.closed_at, "state": segment.state, "peak_state": segment.peak_state,
                  "dominant_mode": segment.dominant_mode, "p_failure_max": segment.p_failure_max,
                  "events": segment.events, "now": now}
        if not overlapping:
            episode_id = (await (await conn.execute(INSERT, values)).fetchone() or [0])[0]
            kinds = ["opened"] + (["to_alarm"] if segment.first_state != segment.peak_state else [])
            kinds += ["closed"] if segment.closed_at is not None else []
        else:
            keep, *others = overlapping
            for s in overlapping:
                s.matched = True
            episode_id = keep.id
            await conn.execute(UPDATE, {**values, "id": keep.id})
            for other in others:
                await conn.execute("UPDATE alarm_episodes SET merged_into = %s, updated_at = now() WHERE id = %s",
                                   [keep.id, other.id])
            kinds = ["to_alarm"] if SEVERITY[segment.peak_state] > SEVERITY[keep.peak_state] else []
            kinds += ["closed"] if keep.closed_at is None and segment.closed_at is not None else []
        for kind in kinds:
            at = {"opened": segment.opened_at, "to_alarm": segment.to_alarm_at,
                  "closed": segment.closed_at}[kind] or segment.opened_at
            state = {"opened": segment.first_state, "to_alarm": "alarm", "closed": "ok"}[kind]
            transitions.append(Transition(
                episode_id, kind, gateway, machine_id, at, state,
                segment.peak_state, segment.opened_at, segment.closed_at, segment.dominant_mode,
                segment.p_failure_max))
    return transitions
