"""The ops API (SPEC §7): the fleet as central sees it, for dashboards and on-call people. Read-only.

PostgreSQL builds the JSON (json_agg): a page of 10,000 summaries costs no Python object per row. Timestamps are
ISO 8601 in UTC (the pool's connections run with TimeZone=UTC). Long lists are paged with keyset cursors: a
response's `next_cursor`, passed back as `cursor`, continues exactly after its last row; null means "no more".
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from central.db import one_row
from central.errors import ApiError
from model.states import StateName

DEFAULT_SPAN = timedelta(hours=24)

FLEET = """
SELECT coalesce(json_agg(f ORDER BY f.name), '[]')::text FROM (
    SELECT g.name, g.created_at, g.revoked_at, g.last_seen_at, g.agent_version,
           g.last_status->'buffer_pending' AS buffer_pending,  -- as sent (JSON numbers have no size limit)
           g.last_status->'dropped_total' AS dropped_total,
           g.last_status AS status,
           -- summaries sent again under a stored id with other content (central/conflicts.py)
           (SELECT coalesce(sum(c.times), 0) FROM summary_conflicts c WHERE c.gateway_id = g.id)
               AS conflicting_duplicates,
           count(m.machine_id) AS machines,
           json_build_object('ok', count(*) FILTER (WHERE m.worst_state = 'ok'),
                             'warning', count(*) FILTER (WHERE m.worst_state = 'warning'),
                             'alarm', count(*) FILTER (WHERE m.worst_state = 'alarm')) AS states,
           CASE WHEN bool_or(m.worst_state = 'alarm') THEN 'alarm'
                WHEN bool_or(m.worst_state = 'warning') THEN 'warning'
                WHEN count(m.machine_id) > 0 THEN 'ok' END AS worst_state
    FROM gateways g LEFT JOIN machines m ON m.gateway_id = g.id
    GROUP BY g.id
) f
"""

MACHINES = """
SELECT coalesce(json_agg(x ORDER BY x.p_failure_max DESC, x.gateway, x.machine_id), '[]')::text FROM (
    SELECT g.name AS gateway, m.machine_id, m.worst_state AS state, m.window_start, m.window_end, m.health_last,
           m.p_failure_max, m.mode_risk_max,
           json_build_object('name', m.model_name, 'version', m.model_version) AS model,
           m.first_seen_at, m.updated_at
    FROM machines m JOIN gateways g ON g.id = m.gateway_id
    WHERE (%(states)s::text[] IS NULL OR m.worst_state = ANY(%(states)s::text[]))
      AND (%(gateway)s::text IS NULL OR g.name = %(gateway)s::text)
) x
"""

FIND_MACHINE = """
SELECT g.id, m.machine_id IS NOT NULL FROM gateways g
LEFT JOIN machines m ON m.gateway_id = g.id AND m.machine_id = %s
WHERE g.name = %s
"""

# Each query returns (rows as JSON, the key of the first row beyond the page or nulls).
SUMMARIES = """
WITH page AS (
    SELECT s.window_start AS k_ts, s.gateway_id AS k_gw, s.summary_id AS k_id,
           row_number() OVER (ORDER BY s.window_start, s.summary_id) AS n,
           json_build_object(
               'summary_id', s.summary_id, 'machine_id', s.machine_id, 'window_start', s.window_start,
               'window_end', s.window_end,
               'model', json_build_object('name', s.model_name, 'version', s.model_version, 'sha256', s.model_sha256),
               'readings', s.readings, 'rejected', s.rejected, 'out_of_distribution', s.out_of_distribution,
               'health_min', s.health_min, 'health_mean', s.health_mean, 'health_last', s.health_last,
               'p_failure_max', s.p_failure_max, 'p_failure_mean', s.p_failure_mean,
               'mode_risk_max', s.mode_risk_max, 'worst_state', s.worst_state, 'inputs', s.inputs,
               'batch_id', s.batch_id, 'received_at', s.received_at) AS doc
    FROM summaries s
    WHERE s.gateway_id = %(gateway_id)s AND s.machine_id = %(machine_id)s
      AND s.window_start >= %(since)s
      AND (%(until)s::timestamptz IS NULL OR s.window_start < %(until)s::timestamptz)
      AND (%(c_ts)s::timestamptz IS NULL OR (s.window_start, s.summary_id) > (%(c_ts)s, %(c_id)s::uuid))
    ORDER BY s.window_start, s.summary_id
    LIMIT %(limit)s + 1
)
SELECT coalesce(json_agg(doc ORDER BY n) FILTER (WHERE n <= %(limit)s), '[]')::text,
       max(k_ts) FILTER (WHERE n = %(limit)s), max(k_gw) FILTER (WHERE n = %(limit)s),
       max(k_id::text) FILTER (WHERE n = %(limit)s), count(*) > %(limit)s
FROM page
"""

EVENTS = """
WITH page AS (
    SELECT e.ts AS k_ts, e.gateway_id AS k_gw, e.event_id AS k_id,
           row_number() OVER (ORDER BY e.ts, e.gateway_id, e.event_id) AS n,
           json_build_object(
               'gateway', g.name, 'event_id', e.event_id, 'machine_id', e.machine_id, 'ts', e.ts,
               'from_state', e.from_state, 'to_state', e.to_state, 'p_failure', e.p_failure, 'health', e.health,
               'dominant_mode', e.dominant_mode, 'mode_risk', e.mode_risk, 'reading', e.reading,
               'model', json_build_object('name', e.model_name, 'version', e.model_version, 'sha256', e.model_sha256),
               'batch_id', e.batch_id, 'received_at', e.received_at) AS doc
    FROM events e JOIN gateways g ON g.id = e.gateway_id
    WHERE e.ts >= %(since)s
      AND (%(until)s::timestamptz IS NULL OR e.ts < %(until)s::timestamptz)
      AND (%(gateway)s::text IS NULL OR g.name = %(gateway)s::text)
      AND (%(machine_id)s::text IS NULL OR e.machine_id = %(machine_id)s::text)
      AND (%(states)s::text[] IS NULL OR e.to_state = ANY(%(states)s::text[]))
      AND (%(c_ts)s::timestamptz IS NULL
           OR (e.ts, e.gateway_id, e.event_id) > (%(c_ts)s, %(c_gw)s::integer, %(c_id)s::uuid))
    ORDER BY e.ts, e.gateway_id, e.event_id
    LIMIT %(limit)s + 1
)
SELECT coalesce(json_agg(doc ORDER BY n) FILTER (WHERE n <= %(limit)s), '[]')::text,
       max(k_ts) FILTER (WHERE n = %(limit)s), max(k_gw) FILTER (WHERE n = %(limit)s),
       max(k_id::text) FILTER (WHERE n = %(limit)s), count(*) > %(limit)s
FROM page
"""


def encode_cursor(ts: datetime, gateway_id: int, row_id: str) -> str:
    raw = json.dumps([ts.isoformat(), gateway_id, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict[str, Any]:
    if not cursor:
        return {"c_ts": None, "c_gw": None, "c_id": None}
    try:
        ts, gateway_id, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not 0 <= int(gateway_id) < 2**31:  # gateways.id is a PostgreSQL integer
            raise ValueError(gateway_id)
        return {"c_ts": datetime.fromisoformat(ts), "c_gw": int(gateway_id), "c_id": uuid.UUID(row_id)}
    # A forged cursor can hold any JSON: nested too deeply (RecursionError), an infinite number (OverflowError), a
    # number where the id's string should be (AttributeError).
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError, binascii.Error):
        raise ApiError(422, "invalid_request", "invalid cursor: pass back a next_cursor unchanged") from None


def time_range(since: datetime | None, until: datetime | None) -> dict[str, datetime | None]:
    """[since, until): since defaults to 24 hours ago, until to no end (a gateway's clock may run ahead)."""
    since = since or datetime.now(UTC) - DEFAULT_SPAN
    if until is not None and since >= until:
        raise ApiError(422, "invalid_request", "since must be before until")
    return {"since": since, "until": until}


async def fleet(conn: psycopg.AsyncConnection) -> str:
    rows = (await one_row(conn, FLEET))[0]
    return f'{{"gateways":{rows}}}'


async def machines(conn: psycopg.AsyncConnection, states: list[StateName] | None, gateway: str | None) -> str:
    rows = (await one_row(conn, MACHINES, {"states": states, "gateway": gateway}))[0]
    return f'{{"machines":{rows}}}'


async def summaries(conn: psycopg.AsyncConnection, gateway: str, machine_id: str, since: datetime | None,
                    until: datetime | None, limit: int, cursor: str | None) -> str:
    found = await (await conn.execute(FIND_MACHINE, [machine_id, gateway])).fetchone()
    if found is None:
        raise ApiError(404, "not_found", f"no gateway named {gateway!r}")
    gateway_id, known = found
    if not known:
        raise ApiError(404, "not_found", f"gateway {gateway!r} has sent nothing about machine {machine_id!r}")
    params = {"gateway_id": gateway_id, "machine_id": machine_id, "limit": limit, **time_range(since, until),
              **decode_cursor(cursor)}
    page = await one_row(conn, SUMMARIES, params)
    return _page("summaries", page, {"gateway": gateway, "machine_id": machine_id})


async def events(conn: psycopg.AsyncConnection, since: datetime | None, until: datetime | None,
                 gateway: str | None, machine_id: str | None, states: list[StateName] | None, limit: int,
                 cursor: str | None) -> str:
    params = {"gateway": gateway, "machine_id": machine_id, "states": states, "limit": limit,
              **time_range(since, until), **decode_cursor(cursor)}
    page = await one_row(conn, EVENTS, params)
    return _page("events", page, {})


def _page(name: str, page: tuple[Any, ...], extra: dict[str, str]) -> str:
    rows, k_ts, k_gw, k_id, more = page
    cursor = encode_cursor(k_ts, k_gw, k_id) if more else None
    head = "".join(f"{json.dumps(k)}:{json.dumps(v)}," for k, v in extra.items())
    return f'{{{head}"{name}":{rows},"next_cursor":{json.dumps(cursor)}}}'
