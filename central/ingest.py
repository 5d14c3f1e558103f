"""`POST /api/v1/ingest` (SPEC §6): read the body within its limit, decode it, validate it, store it once.

The size limit (`max_body_bytes`) holds for the bytes on the wire and again for the decompressed JSON: a
Content-Length above it is refused before reading, a body is read only up to it, and gzip is inflated in bounded
steps, so a gzip bomb costs at most the limit in memory before it gets 413.

Storing: the batch is re-serialised by pydantic (normalised: ISO timestamps, no lax values) and handed to
PostgreSQL as one jsonb value per kind, unpacked by `jsonb_to_recordset` into `INSERT ... ON CONFLICT DO NOTHING
RETURNING`: strings travel as JSON values, never as SQL. The rows returned are the accepted ones; the rest of the
batch were duplicates (sent before, or twice in the batch). The machine limit's check (central/limits.py), the
gateway's last status, the events, the summaries, the machines' latest state, the shadow figures and the conflicting
duplicates (central/conflicts.py) are one statement, sent with the planner setting it runs under (GENERIC_PLAN) in
one pipeline: one round trip, whatever the batch size. A batch of summaries alone needs no transaction block (the
pipeline is one implicit transaction); the caller opens one for events and actions, whose episodes and notifications
follow in further statements.
"""

from __future__ import annotations

import ipaddress
import uuid
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request

from central import conflicts, limits
from central.auth import Gateway
from central.db import no_row
from central.errors import ApiError
from sync.protocol import Counts, Event, IngestBatch, IngestResult, Summary

MAX_ERRORS = 50  # validation errors listed in a 422; the count says how many there were
MAX_COUNT = 2**31 - 1  # a summary's counts are PostgreSQL integers
COUNTS = ("readings", "rejected", "out_of_distribution")


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, "payload_too_large", f"the {what} exceeds {limit:,} bytes; send smaller batches")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most `limit` bytes (413 beyond), checked against Content-Length before reading."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length header")
        if int(length) > limit:
            raise too_large(limit, "request body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, "request body")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The JSON bytes of the body: gunzipped when Content-Encoding is gzip, at most `limit` bytes of them."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise ApiError(415, "unsupported_encoding",
                          f"Content-Encoding {content_encoding!r} is not supported; send gzip or no encoding")
    out, size, data = [], 0, body
    try:
        while data:  # one gzip member per round: concatenated members are valid gzip
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            while data:
                # At most what is left of the limit, plus one byte to tell "exactly at the limit" from "beyond".
                chunk = inflater.decompress(data, limit - size + 1)
                size += len(chunk)
                if size > limit:
                    raise too_large(limit, "decompressed body")
                out.append(chunk)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    break
            if not inflater.eof:
                raise ApiError(400, "bad_request", "the gzip body is truncated")
            data = inflater.unused_data
    except zlib.error as exc:
        raise ApiError(400, "bad_request", f"the body is not valid gzip: {exc}") from None
    return b"".join(out)


def parse(raw: bytes) -> IngestBatch:
    """The validated batch; 422 with the validation errors (location, message, type; never the input)."""
    try:
        batch = IngestBatch.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:MAX_ERRORS]]
        raise ApiError(422, "invalid_batch", f"the batch is not valid: {len(errors)} error(s)"
                          + (f", the first {MAX_ERRORS} listed" if len(errors) > MAX_ERRORS else ""), details) from None
    details = list(_beyond_schema(batch))
    if details:
        raise ApiError(422, "invalid_batch", f"the batch is not valid: {len(details)} error(s)", details[:MAX_ERRORS])
    return batch


def _beyond_schema(batch: IngestBatch) -> Iterator[dict[str, Any]]:
    """What the protocol's schema lets through but PostgreSQL cannot store or the data cannot mean: NUL characters
    in text, counts beyond PostgreSQL's integer, times that leave the calendar once converted to UTC (year 1 with a
    positive offset, year 9999 with a negative one), windows that end before they start. One pass, cheap checks."""
    if "\x00" in batch.agent_version:
        yield _nul(["agent_version"])
    if _off_calendar(batch.sent_at):
        yield _off_range(["sent_at"])
    named: list[tuple[str, Sequence[Summary | Event]]] = [("summaries", batch.summaries), ("events", batch.events)]
    for kind, items in named:
        for i, item in enumerate(items):
            if "\x00" in item.model.name or "\x00" in item.model.version:
                field = "name" if "\x00" in item.model.name else "version"
                yield _nul([kind, i, "model", field])
    for i, s in enumerate(batch.summaries):
        for field in COUNTS:
            if getattr(s, field) > MAX_COUNT:
                yield {"loc": ["summaries", i, field], "msg": f"must be at most {MAX_COUNT}", "type": "less_than_equal"}
        if _off_calendar(s.window_start):
            yield _off_range(["summaries", i, "window_start"])
        elif _off_calendar(s.window_end):
            yield _off_range(["summaries", i, "window_end"])
        elif s.window_end <= s.window_start:
            yield {"loc": ["summaries", i, "window_end"], "msg": "window_end must be after window_start",
                   "type": "window_order"}
    for i, e in enumerate(batch.events):
        if _off_calendar(e.ts):
            yield _off_range(["events", i, "ts"])
    for i, a in enumerate(batch.actions):
        for field in ("opened_at", "at"):
            if _off_calendar(getattr(a, field)):
                yield _off_range(["actions", i, field])


def _off_calendar(moment: datetime) -> bool:
    if 1 < moment.year < 9999:
        return False
    try:
        moment.astimezone(UTC)
    except OverflowError:
        return True
    return False


def _nul(loc: list[str | int]) -> dict[str, Any]:
    return {"loc": loc, "msg": "NUL characters (\\u0000) are not allowed in text", "type": "nul_char"}


def _off_range(loc: list[str | int]) -> dict[str, Any]:
    return {"loc": loc, "msg": "out of the representable range once converted to UTC", "type": "datetime_range"}


_SUMMARIES = TypeAdapter(list[Summary])
_EVENTS = TypeAdapter(list[Event])

# One statement, so one round trip and one transaction (a statement is atomic): the machine limit's check, the
# gateway's status, the events, the summaries, the machines' latest state, the shadow figures, the conflicting
# duplicates. Every part runs only when the gateway is still active under the token the batch came with and the batch
# names no machine beyond its limit (`gw` has its row): a token revoked (or replaced) while the batch was being read,
# or a refused batch, stores nothing. The
# machines' latest state moves forward only: a late batch of old windows leaves it alone.
STORE = f"""
WITH sent AS MATERIALIZED (
    SELECT * FROM jsonb_to_recordset(%(summaries)s::jsonb) AS s(
        summary_id uuid, machine_id text, window_start timestamptz, window_end timestamptz, model jsonb,
        readings integer, rejected integer, out_of_distribution integer, health_min double precision,
        health_mean double precision, health_last double precision, p_failure_max double precision,
        p_failure_mean double precision, worst_state text, mode_risk_max jsonb, inputs jsonb, shadow jsonb)
), limited AS ({limits.REFUSED}), gw AS (
    UPDATE gateways SET last_seen_at = now(), last_addr = %(addr)s, agent_version = %(agent_version)s,
                        last_batch_id = %(batch_id)s, last_status = %(status)s::jsonb
    WHERE id = %(gateway_id)s AND token_hash = %(token_hash)s AND revoked_at IS NULL
      AND (SELECT cardinality(refused) = 0 FROM limited)
    RETURNING id
), new_events AS (
    INSERT INTO events (gateway_id, event_id, machine_id, ts, from_state, to_state, p_failure, health, dominant_mode,
                        mode_risk, reading, model_name, model_version, model_sha256, batch_id)
    SELECT gw.id, e.event_id, e.machine_id, e.ts, e.from_state, e.to_state, e.p_failure, e.health,
           e.dominant_mode, e.mode_risk, e.reading, e.model->>'name', e.model->>'version', e.model->>'sha256',
           %(batch_id)s
    FROM gw, jsonb_to_recordset(%(events)s::jsonb) AS e(
        event_id uuid, machine_id text, ts timestamptz, from_state text, to_state text, p_failure double precision,
        health double precision, dominant_mode text, mode_risk jsonb, reading jsonb, model jsonb)
    ON CONFLICT DO NOTHING
    RETURNING event_id
), new_summaries AS (
    INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                           model_sha256, readings, rejected, out_of_distribution, health_min, health_mean,
                           health_last, p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
    SELECT gw.id, s.summary_id, s.machine_id, s.window_start, s.window_end, s.model->>'name', s.model->>'version',
           s.model->>'sha256', s.readings, s.rejected, s.out_of_distribution, s.health_min, s.health_mean,
           s.health_last, s.p_failure_max, s.p_failure_mean, s.worst_state, s.mode_risk_max, s.inputs, %(batch_id)s
    FROM gw, sent AS s
    ON CONFLICT DO NOTHING
    RETURNING gateway_id, {conflicts.RETURNED}
), stored AS (
    SELECT count(*) AS n FROM new_summaries
), latest AS (
    SELECT DISTINCT ON (machine_id) gateway_id, machine_id, summary_id, window_start, window_end, worst_state,
                                    health_last, p_failure_max, mode_risk_max, model_name, model_version,
                                    -- the failure mode of highest risk (ties: the first name), null when none
                                    (SELECT key FROM jsonb_each(mode_risk_max) WHERE jsonb_typeof(value) = 'number'
                                     ORDER BY value::double precision DESC, key LIMIT 1) AS dominant_mode
    FROM new_summaries ORDER BY machine_id, window_start DESC
), machines AS (
    INSERT INTO machines AS m (gateway_id, machine_id, summary_id, window_start, window_end, worst_state, health_last,
                               p_failure_max, mode_risk_max, model_name, model_version, dominant_mode)
    SELECT gateway_id, machine_id, summary_id, window_start, window_end, worst_state, health_last, p_failure_max,
           mode_risk_max, model_name, model_version, dominant_mode
    FROM latest
    ON CONFLICT (gateway_id, machine_id) DO UPDATE SET
        summary_id = excluded.summary_id, window_start = excluded.window_start, window_end = excluded.window_end,
        worst_state = excluded.worst_state, health_last = excluded.health_last,
        p_failure_max = excluded.p_failure_max, mode_risk_max = excluded.mode_risk_max,
        model_name = excluded.model_name, model_version = excluded.model_version,
        dominant_mode = excluded.dominant_mode, updated_at = now()
    WHERE m.window_start <= excluded.window_start
), shadows AS (
    -- Shadow figures of newly stored summaries only (a resend counts once): the rollout gates' input.
    INSERT INTO shadow_figures AS f (gateway_id, name, version, readings, agreed, live_warning, live_alarm, warning,
                                     alarm, out_of_distribution, score_s)
    SELECT n.gateway_id, x.shadow->'model'->>'name', x.shadow->'model'->>'version',
           sum((x.shadow->>'readings')::bigint), sum((x.shadow->>'agreed')::bigint),
           sum((x.shadow->>'live_warning')::bigint), sum((x.shadow->>'live_alarm')::bigint),
           sum((x.shadow->>'warning')::bigint), sum((x.shadow->>'alarm')::bigint),
           sum((x.shadow->>'out_of_distribution')::bigint), sum((x.shadow->>'score_s')::double precision)
    FROM new_summaries n JOIN sent AS x ON x.summary_id = n.summary_id AND x.window_start = n.window_start
    WHERE x.shadow IS NOT NULL
    GROUP BY 1, 2, 3
    ON CONFLICT (gateway_id, name, version) DO UPDATE SET
        readings = f.readings + excluded.readings, agreed = f.agreed + excluded.agreed,
        live_warning = f.live_warning + excluded.live_warning, live_alarm = f.live_alarm + excluded.live_alarm,
        warning = f.warning + excluded.warning, alarm = f.alarm + excluded.alarm,
        out_of_distribution = f.out_of_distribution + excluded.out_of_distribution,
        score_s = f.score_s + excluded.score_s, updated_at = now()
), {conflicts.CTES}
SELECT (SELECT count(*) FROM gw), (SELECT count(*) FROM new_events), (SELECT n FROM stored),
       (SELECT array_agg(event_id) FROM new_events), limited.known, limited.refused,
       {conflicts.RESULTS}
FROM limited
"""


# STORE's plan, made once per connection: PostgreSQL's own choice ("auto") planned it again for most batches of a
# fleet-scale run (10,576 plans of 15,030 calls, 1.5 ms each with 8 daily partitions, 3-4 ms with a month's), the
# generic plan costing the same to run. Set for STORE alone (the dashboard's queries rely on custom plans, e.g. a
# LIMIT), until the end of its transaction: sent with it in one pipeline, so no round trip of its own.
GENERIC_PLAN = "SELECT set_config('plan_cache_mode', 'force_generic_plan', true)"
DEFAULT_PLAN = "RESET plan_cache_mode"


class Revoked(Exception):
    """The gateway's token was revoked (or replaced by a new one) while its batch was being processed."""


async def store(conn: psycopg.AsyncConnection, gateway: Gateway, batch: IngestBatch,
                client_host: str | None, new_events: list[uuid.UUID] | None = None,
                max_machines: int | None = None) -> IngestResult:
    """Write the batch atomically (STORE is one statement: in autocommit mode its pipeline is one implicit
    transaction, else it is part of the caller's transaction); nothing is written and ApiError 422
    `too_many_machines` is raised when it names new machines beyond `max_machines` (None: no limit), Revoked when the
    token was revoked meanwhile. `new_events` receives the ids of the events newly stored (not the duplicates): the
    alarm episodes are built from these, in the caller's transaction (central/episodes.py). Conflicting duplicates
    are recorded and logged (central/conflicts.py)."""
    params = {
        "gateway_id": gateway.id, "token_hash": gateway.token_hash, "batch_id": batch.batch_id,
        "addr": address(client_host),
        "agent_version": batch.agent_version, "status": batch.gateway.model_dump_json(exclude_none=True),
        "machine_ids": limits.machine_ids(batch), "max_machines": max_machines, "sent_count": len(batch.summaries),
        "events": _EVENTS.dump_json(batch.events).decode(),
        # Without the None fields (a missing key is NULL to jsonb_to_recordset, and only `shadow` and the model's
        # package_digest can be None): a third cheaper than excluding `shadow` by name.
        "summaries": _SUMMARIES.dump_json(batch.summaries, exclude_none=True).decode()}
    in_transaction = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    async with conn.pipeline():  # one round trip, one transaction (implicit, or the caller's)
        await conn.execute(GENERIC_PLAN)
        stored = await conn.execute(STORE, params)
        if in_transaction:  # which goes on after STORE
            await conn.execute(DEFAULT_PLAN)
    (active, events, summaries, event_ids, known, refused, conflicted,
     unmatched) = await stored.fetchone() or no_row(STORE)
    if refused:
        assert max_machines is not None
        raise limits.refusal(gateway, batch, known, refused, max_machines)
    if not active:
        raise Revoked()
    if conflicted:
        conflicts.log_first(gateway, batch.batch_id, conflicted)
    if unmatched:  # stored by a concurrent batch after this statement's snapshot
        ids = set(unmatched)
        await conflicts.record(conn, gateway, batch.batch_id, [s for s in batch.summaries if s.summary_id in ids])
    if new_events is not None:
        new_events.extend(event_ids or [])
    return IngestResult(
        accepted=Counts(summaries=summaries, events=events),
        duplicates=Counts(summaries=len(batch.summaries) - summaries, events=len(batch.events) - events))


def address(host: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:
        return None  # e.g. a Unix socket, or the test client
