"""Actions technicians took on alarm episodes at a gateway (SPEC §10), applied in the ingest transaction.

A gateway names an episode by the event that opened it (`episode_id` = that event's id, `opened_at` its time), which
both ends know; central's episodes have ids of their own. The episode an action belongs to is the one (not merged
into another) of the gateway's machine whose span holds that event, so an episode rebuilt or joined by a late event
still receives it. An action whose event central has not stored yet (still in the gateway's outbox, or in this very
batch's later part) is answered as `unknown`: the gateway keeps it and sends it again.

Each action is applied once: its row in the audit log (alarm_actions) carries the gateway's deterministic action id,
unique per gateway, so a batch sent again finds it and counts a duplicate. Applying:
- acknowledge: the first acknowledgement stands (as at central), at the time the technician gave it; it stops the
  episode's escalation as one made at central does;
- label: the latest label by the time it was given wins, wherever it was given: a label from a gateway that was
  offline for hours does not override one ops gave since.
The time is the gateway's (kept as given in the audit row's detail, `at`), but never later than central's now: a
gateway clock running ahead must not make its labels win over later ones.
Down (SPEC §9, §10): `acknowledgements` lists the gateway's open episodes that are acknowledged, each named by its
opening event, for the desired state; its ETag covers the list (sync.desired.etag).

Who: the audit row's actor is "technician at gateway <name>" and, in its detail, the name the technician gave; from
where: the gateway's address (client_addr), and the technician's address at the gateway in the detail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import psycopg

from sync import desired
from sync.desired import MAX_ACKNOWLEDGEMENTS
from sync.protocol import Acknowledgement, ActionResult, GatewayAction

EPISODE = """
SELECT a.id FROM events e
JOIN alarm_episodes a ON a.gateway_id = e.gateway_id AND a.machine_id = e.machine_id AND a.merged_into IS NULL
                     AND a.opened_at <= e.ts AND (a.closed_at IS NULL OR a.closed_at >= e.ts)
WHERE e.gateway_id = %(gw)s AND e.event_id = %(event)s AND e.ts = %(ts)s AND e.machine_id = %(machine)s
ORDER BY a.opened_at DESC, a.id DESC LIMIT 1
FOR UPDATE OF a
"""
AUDIT = """
INSERT INTO alarm_actions (episode_id, actor, action, detail, client_addr, at, gateway_id, action_id)
VALUES (%(episode)s, %(actor)s, %(action)s, %(detail)s::jsonb, %(addr)s, least(%(at)s::timestamptz, now()), %(gw)s,
        %(action_id)s)
ON CONFLICT (gateway_id, action_id) WHERE action_id IS NOT NULL DO NOTHING
RETURNING id
"""
ACKNOWLEDGE = """
UPDATE alarm_episodes SET acknowledged_at = coalesce(acknowledged_at, least(%(at)s::timestamptz, now())),
    acknowledged_by = coalesce(acknowledged_by, %(who)s), updated_at = now()
WHERE id = %(episode)s
"""
# The label given latest (by the time it was given) is the episode's; this one's audit row is already written.
LABEL = """
UPDATE alarm_episodes SET label = %(label)s, label_mode = %(mode)s, updated_at = now()
WHERE id = %(episode)s AND NOT EXISTS (
    SELECT FROM alarm_actions x WHERE x.episode_id = %(episode)s AND x.action = 'label'
                                  AND x.at > least(%(at)s::timestamptz, now()))
"""


# The opening event: the machine's event at the episode's opened_at (events_machine_ts; one partition).
ACKNOWLEDGED = """
SELECT e.event_id, a.machine_id, a.acknowledged_at, a.acknowledged_by
FROM alarm_episodes a
JOIN LATERAL (SELECT e.event_id FROM events e WHERE e.gateway_id = a.gateway_id AND e.machine_id = a.machine_id
              AND e.ts = a.opened_at ORDER BY e.event_id LIMIT 1) e ON true
WHERE a.gateway_id = %s AND a.closed_at IS NULL AND a.merged_into IS NULL AND a.acknowledged_at IS NOT NULL
ORDER BY a.opened_at, a.id
LIMIT %s
"""


async def acknowledgements(conn: psycopg.AsyncConnection[Any], gateway_id: int) -> list[desired.Acknowledgement]:
    """The gateway's open, acknowledged episodes, oldest first, for its desired state."""
    rows = await (await conn.execute(ACKNOWLEDGED, [gateway_id, MAX_ACKNOWLEDGEMENTS])).fetchall()
    return [desired.Acknowledgement(episode_id=event_id, machine_id=machine, acknowledged_at=at,
                                    acknowledged_by=_printable(by)) for event_id, machine, at, by in rows]


def _printable(text: str | None) -> str | None:
    """As sync.protocol.Text allows: printable, at most 200 characters (a name given at central may be longer)."""
    if text is None:
        return None
    shown = "".join(ch if ch.isprintable() else " " for ch in text)
    return shown[:197] + "..." if len(shown) > 200 else shown


def actor(gateway: str) -> str:
    return f"technician at gateway {gateway}"


async def apply(conn: psycopg.AsyncConnection[Any], gateway_id: int, gateway: str, actions: Sequence[GatewayAction],
                client_addr: str | None) -> ActionResult:
    """Apply the batch's actions; call inside the ingest transaction, after its events and their episodes."""
    accepted = duplicates = 0
    unknown = []
    for action in actions:
        row = await (await conn.execute(EPISODE, {
            "gw": gateway_id, "event": action.episode_id, "ts": action.opened_at,
            "machine": action.machine_id})).fetchone()
        if row is None:
            unknown.append(action.action_id)
            continue
        episode = row[0]
        who = f"{action.by} ({actor(gateway)})" if action.by else actor(gateway)
        if isinstance(action, Acknowledgement):
            detail: dict[str, Any] = {"note": action.note} if action.note else {}
            change, values = ACKNOWLEDGE, {"who": who, "label": None, "mode": None}
        else:
            detail = {"label": action.label, "mode": action.mode}
            change, values = LABEL, {"who": who, "label": action.label, "mode": action.mode}
        detail = {**detail, **({"by": action.by} if action.by else {}), "gateway": gateway, "at": action.at.isoformat(),
                  "gateway_episode": str(action.episode_id), **({"client": action.client} if action.client else {})}
        inserted = await (await conn.execute(AUDIT, {
            "episode": episode, "actor": actor(gateway), "action": action.action, "detail": json.dumps(detail),
            "addr": client_addr, "at": action.at, "gw": gateway_id, "action_id": action.action_id})).fetchone()
        if inserted is None:
            duplicates += 1
            continue
        await conn.execute(change, {**values, "episode": episode, "at": action.at})
        accepted += 1
    return ActionResult(accepted=accepted, duplicates=duplicates, unknown=unknown)
