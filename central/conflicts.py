"""Conflicting duplicates (issue 14 item 17): a summary sent again under a key central already stores (gateway,
summary_id and window start: the partitioned table's key, migration 0006), but with other content (another
machine_id, window end, model or figures).

Ids are deterministic (sync.protocol.summary_id: UUIDv5 of gateway, machine and window start), so a resend carries
the same content; a conflict is a bug on some gateway (a clock, a renamed machine, a broken outbox). Central keeps
the summary it stored first and answers as for any duplicate (the protocol's counts; an agent must not stop syncing
or retry forever over it): refusing with 409 would stop that gateway's sync for what is, at central, already safe.
Instead the conflict is not silent: counted apart per id in `summary_conflicts` (how many times), logged once per id
at warning level with both machine ids and both batch ids, and shown per gateway in `GET /api/v1/fleet` as
`conflicting_duplicates`.

Checked inside ingest's one statement (CTES, central/ingest.py), only when the batch had duplicates: each sent
summary is compared with the row kept under its key, the one this statement stored (a key sent twice in the batch)
or the one stored before it (the statement's snapshot, one index probe in the key's partition). A batch of new
summaries skips the comparison (a one-time filter), a resend costs no round trip of its own. A duplicate found in
neither was stored by a concurrent batch after the snapshot (ON CONFLICT waited for it): those few are compared
afterwards by RECORD, in a statement of their own that sees it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import psycopg
from pydantic import TypeAdapter

from central.auth import Gateway
from sync.protocol import Summary

log = logging.getLogger("central")

# The content compared: a stored row's columns (prefix `x.`) against a sent summary's (`sent`, as ingest unpacks it).
_STORED = """x.machine_id, x.window_end, x.model_name, x.model_version, x.model_sha256, x.readings, x.rejected,
       x.out_of_distribution, x.health_min, x.health_mean, x.health_last, x.p_failure_max, x.p_failure_mean,
       x.worst_state, x.mode_risk_max, x.inputs"""
_SENT = """s.machine_id, s.window_end, s.model->>'name', s.model->>'version', s.model->>'sha256', s.readings,
       s.rejected, s.out_of_distribution, s.health_min, s.health_mean, s.health_last, s.p_failure_max,
       s.p_failure_mean, s.worst_state, s.mode_risk_max, s.inputs"""
# The columns of `new_summaries` (ingest's INSERT ... RETURNING) this needs.
RETURNED = """summary_id, window_start, machine_id, window_end, model_name, model_version, model_sha256, readings,
              rejected, out_of_distribution, health_min, health_mean, health_last, p_failure_max, p_failure_mean,
              worst_state, mode_risk_max, inputs"""
# A one-time filter: `stored` (ingest's CTE) counts new_summaries, `sent_count` is len(batch.summaries).
_DUPLICATES = "(SELECT n FROM stored) < %(sent_count)s"

# CTEs of ingest's statement, after `gw` (the active gateway), `sent` (the batch's summaries), `new_summaries` and
# `stored`.
CTES = f"""
kept AS (
    SELECT {RETURNED}, %(batch_id)s::uuid AS batch_id FROM new_summaries WHERE {_DUPLICATES}
    UNION ALL
    SELECT x.summary_id, x.window_start, {_STORED}, x.batch_id
    FROM sent s JOIN summaries x
         ON x.gateway_id = %(gateway_id)s AND x.summary_id = s.summary_id AND x.window_start = s.window_start
    WHERE {_DUPLICATES}
      AND NOT EXISTS (SELECT FROM new_summaries n WHERE n.summary_id = s.summary_id
                                                    AND n.window_start = s.window_start)
), conflicting AS (
    INSERT INTO summary_conflicts AS c (gateway_id, summary_id, stored_machine_id, sent_machine_id, stored_batch_id,
                                        sent_batch_id)
    SELECT DISTINCT ON (s.summary_id) gw.id, s.summary_id, x.machine_id, s.machine_id, x.batch_id, %(batch_id)s
    FROM gw, sent s JOIN kept x ON x.summary_id = s.summary_id AND x.window_start = s.window_start
    WHERE ({_STORED}) IS DISTINCT FROM ({_SENT})
    ON CONFLICT (gateway_id, summary_id) DO UPDATE SET
        times = c.times + 1, sent_machine_id = excluded.sent_machine_id, sent_batch_id = excluded.sent_batch_id,
        last_seen_at = now()
    RETURNING summary_id, stored_machine_id, sent_machine_id, stored_batch_id, xmax = 0 AS first
), unmatched AS (
    SELECT s.summary_id FROM gw, sent s
    WHERE {_DUPLICATES}
      AND NOT EXISTS (SELECT FROM kept x WHERE x.summary_id = s.summary_id AND x.window_start = s.window_start)
)"""
# The final SELECT's columns: the ids logged (first conflict of their id) and the duplicates left to RECORD.
RESULTS = """(SELECT array_agg(ARRAY[summary_id::text, stored_machine_id, sent_machine_id, stored_batch_id::text])
        FROM conflicting WHERE first),
       (SELECT array_agg(summary_id) FROM unmatched)"""

# RECORD: CTES's comparison for `summaries` alone, in a statement of its own (the duplicates CTES could not match).
RECORD = f"""
INSERT INTO summary_conflicts AS c (gateway_id, summary_id, stored_machine_id, sent_machine_id, stored_batch_id,
                                    sent_batch_id)
SELECT DISTINCT ON (x.summary_id) x.gateway_id, x.summary_id, x.machine_id, s.machine_id, x.batch_id, %(batch_id)s
FROM jsonb_to_recordset(%(summaries)s::jsonb) AS s(
    summary_id uuid, machine_id text, window_start timestamptz, window_end timestamptz, model jsonb, readings integer,
    rejected integer, out_of_distribution integer, health_min double precision, health_mean double precision,
    health_last double precision, p_failure_max double precision, p_failure_mean double precision, worst_state text,
    mode_risk_max jsonb, inputs jsonb)
JOIN summaries x ON x.gateway_id = %(gateway_id)s AND x.summary_id = s.summary_id AND x.window_start = s.window_start
WHERE ({_STORED}) IS DISTINCT FROM ({_SENT})
ON CONFLICT (gateway_id, summary_id) DO UPDATE SET
    times = c.times + 1, sent_machine_id = excluded.sent_machine_id, sent_batch_id = excluded.sent_batch_id,
    last_seen_at = now()
RETURNING ARRAY[summary_id::text, stored_machine_id, sent_machine_id, stored_batch_id::text], xmax = 0 AS first
"""

_SUMMARIES = TypeAdapter(list[Summary])


def log_first(gateway: Gateway, batch_id: uuid.UUID, rows: Sequence[Sequence[str]]) -> None:
    """One warning per id's first conflict: [summary_id, stored machine, sent machine, stored batch] per row."""
    for summary_id, stored_machine, sent_machine, stored_batch in rows:
        log.warning("gateway %s sent summary %s again with other content: kept the stored one (machine %s, "
                    "batch %s), not the new one (machine %s, batch %s); summary ids are deterministic, so the "
                    "gateway has a bug", gateway.name, summary_id, stored_machine, stored_batch, sent_machine,
                    batch_id)


async def record(conn: psycopg.AsyncConnection, gateway: Gateway, batch_id: uuid.UUID,
                 summaries: Sequence[Summary]) -> None:
    """Record and log the conflicting duplicates among `summaries` (RECORD): the few ingest's statement left."""
    rows = await (await conn.execute(RECORD, {"gateway_id": gateway.id, "batch_id": batch_id,
                                              "summaries": _SUMMARIES.dump_json(list(summaries)).decode()})).fetchall()
    log_first(gateway, batch_id, [row for row, first in rows if first])
