"""The alarms API (SPEC §10): alarm episodes, what people do about them, and the notifications' delivery log.

Routes (ops token as a bearer header, or the dashboard's session cookie; a cookie-borne POST must also come from
this site's own page, as the dashboard's sign-in does):
  GET  /api/v1/alarms                    ?state=open|closed&gateway=&machine=&limit=&cursor=: open ones first, newest
                                         first; `next_cursor` continues after the last row
  GET  /api/v1/alarms/{id}               the episode, its events, its actions (the audit log)
  POST /api/v1/alarms/{id}/acknowledge   {by?, note?}: the first acknowledgement stands; stops its escalation
  POST /api/v1/alarms/{id}/comment       {text, by?}
  POST /api/v1/alarms/{id}/assign        {assignee | null, by?}
  POST /api/v1/alarms/{id}/label         {label: failure|false_alarm|unsure, mode (failure only), by?}
  GET  /api/v1/notifications/deliveries  ?state=&episode=&limit=&cursor=: the outbox, newest first, with the counts
                                         of what is not delivered, this process's worker (running, restarts...) and
                                         how many workers listen in all (`pdm-central notify` processes too)
Every POST writes an audit row: who (the credential: "ops token" or "dashboard session", and the name given as
`by`), when, what, and from where (the client address, X-Forwarded-For's only from PDM_CENTRAL_TRUSTED_PROXIES).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from central import dashboard
from central.db import Connection
from central.errors import ApiError
from central.notify import outbox
from central.params import Name
from central.settings import Settings
from sync.protocol import PRINTABLE_LINES, Printable

JSON = "application/json"
EpisodeId = Annotated[int, Path(ge=1, le=2**63 - 1)]
Person = Annotated[Printable, Field(min_length=1, max_length=100)]  # as at the gateway: shown on terminals too
Text = Annotated[str, Field(min_length=1, max_length=4000, pattern=PRINTABLE_LINES)]  # notes: lines and tabs too


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    by: Person | None = None  # the person acting, as they name themselves


class Acknowledge(_Body):
    note: Text | None = None


class Comment(_Body):
    text: Text


class Assign(_Body):
    assignee: Person | None  # null: unassigned


class FailureLabel(_Body):
    label: Literal["failure"]  # a confirmed failure, of this mode
    mode: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,32}$")]


class OtherLabel(_Body):
    label: Literal["false_alarm", "unsure"]


Label = Annotated[FailureLabel | OtherLabel, Body(discriminator="label")]


EPISODE = """json_build_object(
    'id', a.id, 'gateway', g.name, 'machine_id', a.machine_id,
    'state', CASE WHEN a.closed_at IS NULL THEN a.state ELSE 'ok' END, 'open', a.closed_at IS NULL,
    'peak_state', a.peak_state, 'opened_at', a.opened_at, 'closed_at', a.closed_at,
    'age_s', extract(epoch FROM coalesce(a.closed_at, now()) - a.opened_at),
    'dominant_mode', a.dominant_mode, 'p_failure_max', a.p_failure_max, 'events', a.events,
    'acknowledged_at', a.acknowledged_at, 'acknowledged_by', a.acknowledged_by, 'assignee', a.assignee,
    'label', a.label, 'label_mode', a.label_mode, 'escalated_at', a.escalated_at, 'noticed_at', a.noticed_at,
    'merged_into', a.merged_into)"""

LIST = f"""
SELECT {EPISODE}::text, (a.closed_at IS NULL)::int, a.opened_at, a.id
FROM alarm_episodes a JOIN gateways g ON g.id = a.gateway_id
WHERE a.merged_into IS NULL
  AND (%(open)s::boolean IS NULL OR (a.closed_at IS NULL) = %(open)s::boolean)
  AND (%(gateway)s::text IS NULL OR g.name = %(gateway)s::text)
  AND (%(machine)s::text IS NULL OR a.machine_id = %(machine)s::text)
  AND (%(c_id)s::bigint IS NULL
       OR ((a.closed_at IS NULL)::int, a.opened_at, a.id) < (%(c_open)s::int, %(c_ts)s::timestamptz, %(c_id)s::bigint))
ORDER BY (a.closed_at IS NULL)::int DESC, a.opened_at DESC, a.id DESC
LIMIT %(limit)s + 1
"""

DETAIL = f"""
SELECT {EPISODE}::jsonb || jsonb_build_object(
    'event_list', (SELECT coalesce(jsonb_agg(x.doc ORDER BY x.ts, x.event_id), '[]') FROM (
        SELECT e.ts, e.event_id, jsonb_build_object(
            'event_id', e.event_id, 'ts', e.ts, 'from_state', e.from_state, 'to_state', e.to_state,
            'p_failure', e.p_failure, 'health', e.health, 'dominant_mode', e.dominant_mode, 'mode_risk', e.mode_risk,
            'reading', e.reading) AS doc
        FROM events e WHERE e.gateway_id = a.gateway_id AND e.machine_id = a.machine_id AND e.ts >= a.opened_at
          AND (a.closed_at IS NULL OR e.ts <= a.closed_at)
        ORDER BY e.ts, e.event_id LIMIT 1000) x),  -- a machine flapping for days: its first 1,000 ('events' counts all)
    'actions', (SELECT coalesce(jsonb_agg(jsonb_build_object(
            'at', x.at, 'actor', x.actor, 'action', x.action, 'detail', x.detail, 'client_addr', host(x.client_addr))
            ORDER BY x.id), '[]') FROM alarm_actions x WHERE x.episode_id = a.id))
FROM alarm_episodes a JOIN gateways g ON g.id = a.gateway_id WHERE a.id = %s
"""

AUDIT = """
INSERT INTO alarm_actions (episode_id, actor, action, detail, client_addr) VALUES (%s, %s, %s, %s::jsonb, %s)
"""
CHANGES = {
    "acknowledge": "UPDATE alarm_episodes SET acknowledged_at = coalesce(acknowledged_at, now()), "
                   "acknowledged_by = coalesce(acknowledged_by, %(who)s), updated_at = now() WHERE id = %(id)s",
    "comment": None,
    "assign": "UPDATE alarm_episodes SET assignee = %(assignee)s, updated_at = now() WHERE id = %(id)s",
    "label": "UPDATE alarm_episodes SET label = %(label)s, label_mode = %(mode)s, updated_at = now() "
             "WHERE id = %(id)s",
}

DELIVERIES = """
SELECT json_build_object('delivery_id', delivery_id, 'route', route, 'channel', channel, 'episode_id', episode_id,
                         'transition', transition, 'state', state, 'digest_id', digest_id, 'created_at', created_at,
                         'attempts', attempts, 'next_attempt_at', CASE WHEN state = 'pending' THEN due_at END,
                         'last_error', last_error, 'delivered_at', delivered_at)::text, created_at, delivery_id
FROM notify_outbox
WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(episode)s::bigint IS NULL OR episode_id = %(episode)s::bigint)
  AND (%(c_ts)s::timestamptz IS NULL OR (created_at, delivery_id) < (%(c_ts)s::timestamptz, %(c_id)s::uuid))
ORDER BY created_at DESC, delivery_id DESC
LIMIT %(limit)s + 1
"""


def _cursor(values: list[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _uncursor(cursor: str | None, kinds: tuple[Callable[[str], Any], ...]) -> list[Any] | None:
    if not cursor:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list) or len(values) != len(kinds) or not all(isinstance(v, str) for v in values):
            raise ValueError(cursor)
        return [kind(value) for kind, value in zip(kinds, values, strict=True)]
    except (ValueError, TypeError, RecursionError, binascii.Error):
        raise ApiError(422, "invalid_request", "invalid cursor: pass back a next_cursor unchanged") from None


def _bigint(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise ValueError(text)
    return value


def _page(name: str, rows: list[tuple[Any, ...]], limit: int) -> str:
    cursor = _cursor(list(rows[limit - 1][1:])) if len(rows) > limit else None
    return f'{{"{name}":[{",".join(row[0] for row in rows[:limit])}],"next_cursor":{json.dumps(cursor)}}}'


def _address(request: Request) -> str | None:
    try:
        return str(ipaddress.ip_address(request.client.host)) if request.client else None
    except ValueError:
        return None


def routes(api: FastAPI, settings: Settings, connection: Connection,
           require_ops: Callable[[Request], Awaitable[None]]) -> None:
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_ops)], tags=["alarms"], responses={
        401: {"description": "missing or invalid ops token, or no dashboard session"},
        503: {"description": "database unavailable; retry later"}})
    not_found: dict[int | str, dict[str, Any]] = {404: {"description": "no such episode"}}
    acted: dict[int | str, dict[str, Any]] = {
        **not_found, 400: {"description": "the body is not JSON"},
        403: {"description": "a session's POST from another site's page"},
             409: {"description": "the episode was merged into another: act on that one"}}

    @router.get("/alarms")
    async def list_alarms(request: Request, state: Literal["open", "closed"] | None = None,
                          gateway: Name | None = None, machine: Name | None = None,
                          limit: Annotated[int, Query(ge=1, le=500)] = 100, cursor: str | None = None) -> Response:
        after = _uncursor(cursor, (_bigint, datetime.fromisoformat, _bigint))
        params = {"open": None if state is None else state == "open", "gateway": gateway, "machine": machine,
                  "limit": limit, "c_open": after[0] if after else None, "c_ts": after[1] if after else None,
                  "c_id": after[2] if after else None}
        async with connection(request) as conn:
            rows = await (await conn.execute(LIST, params)).fetchall()
        return Response(_page("alarms", rows, limit), media_type=JSON)

    @router.get("/alarms/{episode_id}", responses=not_found)
    async def get_alarm(request: Request, episode_id: EpisodeId) -> Response:
        async with connection(request) as conn:
            return Response(await _detail(conn, episode_id), media_type=JSON)

    async def act(request: Request, episode_id: int, action: str, detail: dict[str, Any]) -> Response:
        bearer = request.headers.get("authorization") is not None
        if not bearer and (refusal := dashboard.cross_site(request, f"{action} of an alarm")) is not None:
            raise refusal
        actor = "ops token" if bearer else "dashboard session"
        who = f"{detail['by']} ({actor})" if detail.get("by") else actor
        async with connection(request) as conn, conn.transaction():
            row = await (await conn.execute("SELECT merged_into FROM alarm_episodes WHERE id = %s FOR UPDATE",
                                            [episode_id])).fetchone()
            if row is None:
                raise ApiError(404, "not_found", f"no alarm episode {episode_id}")
            if row[0] is not None:
                raise ApiError(409, "merged", f"episode {episode_id} was merged into episode {row[0]}; act on that one")
            change = CHANGES[action]
            if change is not None:
                await conn.execute(change, {**detail, "id": episode_id, "who": who})
            await conn.execute(AUDIT, [episode_id, actor, action, json.dumps(detail), _address(request)])
            return Response(await _detail(conn, episode_id), media_type=JSON)

    @router.post("/alarms/{episode_id}/acknowledge", responses=acted)
    async def acknowledge(request: Request, episode_id: EpisodeId, body: Acknowledge | None = None) -> Response:
        return await act(request, episode_id, "acknowledge", (body or Acknowledge()).model_dump(exclude_none=True))

    @router.post("/alarms/{episode_id}/comment", responses=acted)
    async def comment(request: Request, episode_id: EpisodeId, body: Comment) -> Response:
        return await act(request, episode_id, "comment", body.model_dump(exclude_none=True))

    @router.post("/alarms/{episode_id}/assign", responses=acted)
    async def assign(request: Request, episode_id: EpisodeId, body: Assign) -> Response:
        return await act(request, episode_id, "assign", body.model_dump())

    @router.post("/alarms/{episode_id}/label", responses=acted)
    async def label(request: Request, episode_id: EpisodeId, body: Label) -> Response:
        return await act(request, episode_id, "label", {"mode": None, **body.model_dump()})

    @router.get("/notifications/deliveries")
    async def deliveries(request: Request,
                         state: Literal["pending", "held", "digested", "delivered", "failed"] | None = None,
                         episode: Annotated[int, Query(ge=1, le=2**63 - 1)] | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100, cursor: str | None = None) -> Response:
        after = _uncursor(cursor, (datetime.fromisoformat, uuid.UUID))
        params = {"state": state, "episode": episode, "limit": limit, "c_ts": after[0] if after else None,
                  "c_id": after[1] if after else None}
        async with connection(request) as conn:
            rows = await (await conn.execute(DELIVERIES, params)).fetchall()
            counts = await outbox.undelivered(conn)
            listening = await outbox.listening(conn)
        worker = json.dumps({**request.app.state.notifications.status(), "listening": listening})
        page = _page("deliveries", rows, limit)
        return Response(f'{{"outbox":{counts},"worker":{worker},{page[1:]}', media_type=JSON)

    api.include_router(router)


async def _detail(conn: psycopg.AsyncConnection[Any], episode_id: int) -> str:
    row = await (await conn.execute(DETAIL, [episode_id])).fetchone()
    if row is None:
        raise ApiError(404, "not_found", f"no alarm episode {episode_id}")
    return json.dumps(row[0])


