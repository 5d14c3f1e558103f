"""The notification outbox in PostgreSQL (table notify_outbox, migration 0004): what is written in the ingest
transaction, what the worker claims, and how a delivery ends.

A delivery is one (episode, transition, route, channel); its id is a UUIDv5 of those, so writing it twice (a rebuild
that reports the same transition, two workers escalating the same episode) stores it once, and a receiver can drop
a retry it has already seen by `X-PDM-Delivery`. Claiming sets a lease (due_at moves past the delivery's timeout)
instead of holding a transaction open during the HTTP or SMTP exchange: a worker killed mid-delivery leaves the row
pending, and another worker (or the restarted one) takes it once the lease ends. So a delivery is at least once on
the wire and once in effect.

An ingest that wrote deliveries also sends NOTIFY on CHANNEL (in the same statement; PostgreSQL delivers it at
commit): every worker LISTENs on it, in the API processes or in `pdm-central notify` processes alike, and starts a
round at once. The LISTEN connection is named LISTENER (application_name): the delivery log counts them.

Floods: when a route has already had `digest_after` transitions within `digest_window_s`, further ones are held;
when the oldest held one is `digest_window_s` old, all held ones of the route become one digest delivery per channel.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import psycopg

from central.episodes import Transition
from central.notify.config import NotifyConfig, Route

NAMESPACE = uuid.UUID("2b0e4a55-6f0c-5d7e-9a43-0d1f3c8e7b21")
SCHEMA = "pdm-alarm/1"
DIGEST_SCHEMA = "pdm-digest/1"
DIGEST_LIST_MAX = 200  # transitions listed in one digest; `count` says how many it stands for
BACKOFF_FIRST_S = 15.0
BACKOFF_MAX_S = 30 * 60.0
RETRY_HORIZON = timedelta(hours=24)  # then a delivery is given up as failed (and logged)
RETENTION = timedelta(days=90)  # delivered and digested rows are kept this long for the delivery log
CHANNEL = "pdm_notify"  # NOTIFY'd when an ingest has committed deliveries
HELD_NOTICE = "held"  # the NOTIFY's payload when some of them are held for a digest
LISTENER = "pdm-central notify"  # the application_name of a worker's LISTEN connection


def delivery_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, "/".join(str(p) for p in parts))


def wanted(route: Route, transition: Transition) -> bool:
    """A route from `alarm` hears only of episodes that reach alarm; one from `warning` of every transition."""
    if not route.matches(transition.gateway, transition.machine_id):
        return False
    if route.from_state == "warning":
        return True
    if transition.kind == "opened":
        return transition.state == "alarm"
    return transition.peak_state == "alarm"


INSERT = """
INSERT INTO notify_outbox (delivery_id, route, channel, episode_id, transition, payload, state, created_at, due_at)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)
ON CONFLICT (delivery_id) DO NOTHING
"""
# One statement per batch, whatever the routes: how many transitions each route had within its digest window
# decides, in order, which of its new ones are sent and which are held for the digest; a batch that wrote rows
# NOTIFYs the workers once, with HELD as the payload when some were held (the worker then learns when their digest
# is due).
ENQUEUE = """
WITH routes AS MATERIALIZED (  -- once per route; counted up to digest_after only (a flood costs no longer scans)
    SELECT r.route, r.digest_after, (
        SELECT count(*) FROM (
            SELECT FROM notify_outbox o
            WHERE o.route = r.route AND o.channel = r.first_channel AND o.created_at > r.since
              AND o.transition <> 'digest'
            LIMIT r.digest_after) AS recent) AS n
    FROM jsonb_to_recordset(%(routes)s::jsonb) AS r(route text, first_channel text, digest_after integer,
                                                    since timestamptz)
), written AS (
    INSERT INTO notify_outbox (delivery_id, route, channel, episode_id, transition, payload, state, created_at,
                               due_at)
    SELECT d.delivery_id, d.route, d.channel, d.episode_id, d.transition, d.payload,
           CASE WHEN r.n + d.ordinal >= r.digest_after THEN 'held' ELSE 'pending' END, %(now)s, %(now)s
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS d(delivery_id uuid, route text, channel text, episode_id bigint,
                                                 transition text, payload jsonb, ordinal integer)
    JOIN routes r ON r.route = d.route
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING state
)
SELECT n, CASE WHEN n > 0 THEN pg_notify(%(channel)s, CASE WHEN held > 0 THEN %(held)s ELSE '' END) END
FROM (SELECT count(*) AS n, count(*) FILTER (WHERE state = 'held') AS held FROM written) AS w
"""


async def enqueue(conn: psycopg.AsyncConnection[Any], config: NotifyConfig, transitions: Iterable[Transition],
                  now: datetime) -> int:
    """Write the deliveries of these transitions (in the caller's transaction); how many rows were written."""
    transitions = list(transitions)
    routes, rows = [], []
    for route in config.routes:
        matched = [t for t in transitions if wanted(route, t)]
        if not matched:
            continue
        routes.append({"route": route.name, "first_channel": route.channels[0], "digest_after": route.digest_after,
                       "since": (now - timedelta(seconds=route.digest_window_s)).isoformat()})
        for ordinal, transition in enumerate(matched):
            document = transition.document()
            for channel in route.channels:
                ident = delivery_id(transition.episode_id, transition.kind, route.name, channel)
                rows.append({"delivery_id": str(ident), "route": route.name, "channel": channel,
                             "episode_id": transition.episode_id, "transition": transition.kind,
                             "payload": _payload(ident, route, document), "ordinal": ordinal})
    if not rows:
        return 0
    cursor = await conn.execute(ENQUEUE, {"routes": json.dumps(routes), "rows": json.dumps(rows), "now": now,
                                          "channel": CHANNEL, "held": HELD_NOTICE})
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _payload(ident: uuid.UUID, route: Route, document: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "delivery_id": str(ident), "route": route.name, **document}


def _delivery(route: Route, transition: Transition, kind: str, channel: str) -> tuple[uuid.UUID, dict[str, Any]]:
    ident = delivery_id(transition.episode_id, kind, route.name, channel)
    return ident, _payload(ident, route, {**transition.document(), "transition": kind})


async def _insert(conn: psycopg.AsyncConnection[Any], route: Route, transition: Transition, kind: str, state: str,
                  now: datetime) -> int:
    written = 0
    for channel in route.channels:
        ident, payload = _delivery(route, transition, kind, channel)
        cursor = await conn.execute(INSERT, [ident, route.name, channel, transition.episode_id, kind,
                                             json.dumps(payload), state, now, now])
        written += cursor.rowcount
    return written


ESCALATION_DUE = """
SELECT a.id, g.name, a.machine_id, a.opened_at, a.closed_at, a.state, a.peak_state, a.dominant_mode, a.p_failure_max
FROM alarm_episodes a JOIN gateways g ON g.id = a.gateway_id
WHERE a.closed_at IS NULL AND a.acknowledged_at IS NULL AND a.merged_into IS NULL AND a.noticed_at <= %(cutoff)s
  AND (%(gateways)s::text[] = '{}' OR g.name = ANY(%(gateways)s::text[]))
  AND (%(machines)s::text[] = '{}' OR a.machine_id = ANY(%(machines)s::text[]))
  AND (%(from_state)s = 'warning' OR a.peak_state = 'alarm')
  AND NOT EXISTS (SELECT 1 FROM notify_outbox o WHERE o.episode_id = a.id AND o.route = %(route)s
                  AND o.transition = 'escalation')
ORDER BY a.noticed_at LIMIT 500
"""


async def escalate(conn: psycopg.AsyncConnection[Any], config: NotifyConfig, now: datetime) -> int:
    """One escalation delivery per route for each open episode left unacknowledged longer than its
    escalate_after_min since central heard of it."""
    written = 0
    for route in config.routes:
        if route.escalate_after_min is None:
            continue
        cutoff = now - timedelta(minutes=route.escalate_after_min)
        rows = await (await conn.execute(ESCALATION_DUE, {
            "cutoff": cutoff, "gateways": route.gateways, "machines": route.machines,
            "from_state": route.from_state, "route": route.name})).fetchall()
        for episode_id, gateway, machine, opened, closed, state, peak, mode, p_max in rows:
            transition = Transition(episode_id, "escalation", gateway, machine, now, state, peak, opened, closed,
                                    mode, p_max)
            async with conn.transaction():
                written += await _insert(conn, route, transition, "escalation", "pending", now)
                await conn.execute("UPDATE alarm_episodes SET escalated_at = coalesce(escalated_at, %s) "
                                   "WHERE id = %s", [now, episode_id])
    return written


HELD = """
SELECT delivery_id, channel, payload FROM notify_outbox
WHERE route = %s AND state = 'held' ORDER BY created_at, delivery_id FOR UPDATE SKIP LOCKED
"""


async def flush_digests(conn: psycopg.AsyncConnection[Any], config: NotifyConfig,
                        now: datetime) -> tuple[int, datetime | None]:
    """Turn each route's held transitions into one digest per channel once the oldest is a window old; how many
    digests were written, and when the next one falls due (None: nothing is held)."""
    written, later = 0, []
    for route in config.routes:
        window = timedelta(seconds=route.digest_window_s)
        oldest = await (await conn.execute(
            "SELECT min(created_at) FROM notify_outbox WHERE route = %s AND state = 'held'", [route.name])).fetchone()
        if oldest is None or oldest[0] is None:
            continue
        if oldest[0] > now - window:
            later.append(oldest[0] + window)
            continue
        async with conn.transaction():
            rows = await (await conn.execute(HELD, [route.name])).fetchall()
            by_channel: dict[str, list[tuple[uuid.UUID, dict[str, Any]]]] = {}
            for ident, channel, payload in rows:
                by_channel.setdefault(channel, []).append((ident, payload))
            for channel, held in by_channel.items():
                ident = delivery_id("digest", route.name, channel, held[0][0])
                payload = {"schema": DIGEST_SCHEMA, "delivery_id": str(ident), "route": route.name,
                           "transition": "digest", "count": len(held),
                           "transitions": [p for _, p in held[:DIGEST_LIST_MAX]]}
                cursor = await conn.execute(INSERT, [ident, route.name, channel, None, "digest",
                                                     json.dumps(payload), "pending", now, now])
                written += cursor.rowcount
                await conn.execute("UPDATE notify_outbox SET state = 'digested', digest_id = %s "
                                   "WHERE delivery_id = ANY(%s)", [ident, [i for i, _ in held]])
    return written, min(later) if later else None


CLAIM = """
UPDATE notify_outbox o SET due_at = %(lease_until)s, attempts = o.attempts + 1
FROM (SELECT delivery_id FROM notify_outbox WHERE state = 'pending' AND due_at <= %(now)s
      ORDER BY due_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
WHERE o.delivery_id = c.delivery_id
RETURNING o.delivery_id, o.channel, o.payload::text, o.attempts, o.created_at
"""


async def claim(conn: psycopg.AsyncConnection[Any], now: datetime, lease_s: float,
                limit: int = 20) -> list[tuple[uuid.UUID, str, str, int, datetime]]:
    cursor = await conn.execute(CLAIM, {"now": now, "lease_until": now + timedelta(seconds=lease_s),
                                        "limit": limit})
    return [(row[0], row[1], row[2], row[3], row[4]) for row in await cursor.fetchall()]


def backoff_s(attempts: int) -> float:
    """15 s, 30 s, 1 min, ... up to 30 min between attempts, with jitter (receivers coming back are not stormed)."""
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempts - 1))
    return float(base * random.uniform(0.8, 1.2))


# A round's outcomes in one statement: delivered, or pending again after a backoff, or failed past RETRY_HORIZON;
# and when the next pending delivery (another round's retry, or another worker's lease) falls due.
SETTLE = """
WITH settled AS (
    UPDATE notify_outbox o SET
        state = CASE WHEN u.error IS NULL THEN 'delivered' WHEN u.give_up THEN 'failed' ELSE 'pending' END,
        delivered_at = CASE WHEN u.error IS NULL THEN %(now)s ELSE o.delivered_at END,
        due_at = coalesce(u.retry_at, o.due_at), last_error = u.error
    FROM unnest(%(ids)s::uuid[], %(errors)s::text[], %(retries)s::timestamptz[], %(give_up)s::boolean[])
         AS u(delivery_id, error, retry_at, give_up)
    WHERE o.delivery_id = ANY(%(ids)s::uuid[]) AND o.delivery_id = u.delivery_id  -- by the primary key
)
SELECT min(due_at) FROM notify_outbox WHERE state = 'pending' AND delivery_id <> ALL(%(ids)s::uuid[])
"""


async def settle(conn: psycopg.AsyncConnection[Any], outcomes: list[tuple[uuid.UUID, int, datetime, str | None]],
                 now: datetime) -> tuple[list[bool], datetime | None]:
    """Record each (delivery, attempts, created_at, error or None) of a round: whether each failed one was given
    up, and when the next pending delivery falls due (None: none is pending)."""
    give_up = [error is not None and now - created_at >= RETRY_HORIZON for _, _, created_at, error in outcomes]
    retries = [None if error is None else now + timedelta(seconds=backoff_s(attempts))
               for _, attempts, _, error in outcomes]
    row = await (await conn.execute(SETTLE, {
        "ids": [ident for ident, *_ in outcomes], "errors": [None if e is None else e[:500] for *_, e in outcomes],
        "retries": retries, "give_up": give_up, "now": now})).fetchone()
    due = [at for at, (*_, error), gone in zip(retries, outcomes, give_up, strict=True) if error and not gone]
    found = [at for at in [row[0] if row else None, *due] if at is not None]
    return give_up, min(found) if found else None


async def next_due(conn: psycopg.AsyncConnection[Any]) -> datetime | None:
    """When the first pending delivery falls due (None: none is pending)."""
    row = await (await conn.execute("SELECT min(due_at) FROM notify_outbox WHERE state = 'pending'")).fetchone()
    return row[0] if row else None


async def prune(conn: psycopg.AsyncConnection[Any], now: datetime) -> int:
    """Forget deliveries done more than RETENTION ago (failed ones stay until someone looks: they are few)."""
    cursor = await conn.execute("DELETE FROM notify_outbox WHERE state IN ('delivered', 'digested') "
                                "AND created_at < %s", [now - RETENTION])
    return cursor.rowcount


UNDELIVERED = """
SELECT json_build_object(
    'pending', count(*) FILTER (WHERE state = 'pending'), 'held', count(*) FILTER (WHERE state = 'held'),
    'failed', count(*) FILTER (WHERE state = 'failed'),
    'oldest_pending_at', min(created_at) FILTER (WHERE state = 'pending'))::text
FROM notify_outbox WHERE state IN ('pending', 'held', 'failed')
"""


async def undelivered(conn: psycopg.AsyncConnection[Any]) -> str:
    row = await (await conn.execute(UNDELIVERED)).fetchone()
    return str(row[0]) if row else "{}"


async def listening(conn: psycopg.AsyncConnection[Any]) -> int:
    """How many workers, in whichever process, listen for deliveries now: 0 with routes configured means nothing
    delivers (no `pdm-central notify` running while the API's workers are off)."""
    row = await (await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                    "AND datname = current_database()", [LISTENER])).fetchone()
    return int(row[0]) if row else 0
