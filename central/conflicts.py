"""Conflicting duplicates (issue 14 item 17): a summary sent again under a summary_id central already stores, but
with other content (another machine_id, window, model or figures).

Ids are deterministic (sync.protocol.summary_id: UUIDv5 of gateway, machine and window start), so a resend carries
the same content; a conflict is a bug on some gateway (a clock, a renamed machine, a broken outbox). Central keeps
the summary it stored first and answers as for any duplicate (the protocol's counts; an agent must not stop syncing
or retry forever over it): refusing with 409 would stop that gateway's sync for what is, at central, already safe.
Instead the conflict is not silent: counted apart per id in `summary_conflicts` (how many times), logged once per id
at warning level with both machine ids and both batch ids, and shown per gateway in `GET /api/v1/fleet` as
`conflicting_duplicates`. Checked only when a batch had duplicates: one extra statement on a resend, none otherwise.
"""

from __future__ import annotations

import logging

import psycopg
from pydantic import TypeAdapter

from central.auth import Gateway
from sync.protocol import IngestBatch, Summary

log = logging.getLogger("central")

# The sent summaries whose stored row (same gateway and id) differs; the first time an id conflicts inserts its row
# (xmax = 0), later times count up.
RECORD = """
INSERT INTO summary_conflicts AS c (gateway_id, summary_id, stored_machine_id, sent_machine_id, stored_batch_id,
                                    sent_batch_id)
SELECT DISTINCT ON (x.summary_id) x.gateway_id, x.summary_id, x.machine_id, s.machine_id, x.batch_id, %(batch_id)s
FROM jsonb_to_recordset(%(summaries)s::jsonb) AS s(
    summary_id uuid, machine_id text, window_start timestamptz, window_end timestamptz, model jsonb, readings integer,
    rejected integer, out_of_distribution integer, health_min double precision, health_mean double precision,
    health_last double precision, p_failure_max double precision, p_failure_mean double precision, worst_state text,
    mode_risk_max jsonb, inputs jsonb)
JOIN summaries x ON x.gateway_id = %(gateway_id)s AND x.summary_id = s.summary_id
WHERE (x.machine_id, x.window_start, x.window_end, x.model_name, x.model_version, x.model_sha256, x.readings,
       x.rejected, x.out_of_distribution, x.health_min, x.health_mean, x.health_last, x.p_failure_max,
       x.p_failure_mean, x.worst_state, x.mode_risk_max, x.inputs)
      IS DISTINCT FROM
      (s.machine_id, s.window_start, s.window_end, s.model->>'name', s.model->>'version', s.model->>'sha256',
       s.readings, s.rejected, s.out_of_distribution, s.health_min, s.health_mean, s.health_last, s.p_failure_max,
       s.p_failure_mean, s.worst_state, s.mode_risk_max, s.inputs)
ON CONFLICT (gateway_id, summary_id) DO UPDATE SET
    times = c.times + 1, sent_machine_id = excluded.sent_machine_id, sent_batch_id = excluded.sent_batch_id,
    last_seen_at = now()
RETURNING summary_id, stored_machine_id, sent_machine_id, stored_batch_id, xmax = 0 AS first
"""


_SUMMARIES = TypeAdapter(list[Summary])


async def record(conn: psycopg.AsyncConnection, gateway: Gateway, batch: IngestBatch) -> int:
    """Record the batch's conflicting duplicates, log each id's first one; return how many the batch held."""
    rows = await (await conn.execute(RECORD, {"gateway_id": gateway.id, "batch_id": batch.batch_id,
                                              "summaries": _SUMMARIES.dump_json(batch.summaries).decode()})).fetchall()
    for summary_id, stored_machine, sent_machine, stored_batch, first in rows:
        if first:
            log.warning("gateway %s sent summary %s again with other content: kept the stored one (machine %s, "
                        "batch %s), not the new one (machine %s, batch %s); summary ids are deterministic, so the "
                        "gateway has a bug", gateway.name, summary_id, stored_machine, stored_batch, sent_machine,
                        batch.batch_id)
    return len(rows)
