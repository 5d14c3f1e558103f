"""How many machines one gateway may have at central (issue 22 item 6): a gateway that invents machine ids (a
publisher on its broker did: 20,000 ids gave 20,003 machine rows) must not grow the fleet's tables without end.

A batch naming machines central does not know yet for this gateway, beyond `PDM_CENTRAL_MAX_MACHINES_PER_GATEWAY` (default 10,000), is refused
with 422 `too_many_machines`, each refused record listed. The agent answers a 422 as it does any invalid record: it
splits the batch until the refused records stand alone, sends the rest, and sets the refused ones aside in its
dead letters with this reason (counted in its `pdm_sync_set_aside_total`). Refusing, rather than accepting the
batch and dropping the records quietly, keeps what was refused visible on both sides; new machines within the
limit are taken in machine id order, so the split converges. Central logs the refusals once a minute per gateway.

The check is part of ingest's one statement (REFUSED below), which stores nothing of a batch it refuses: no round
trip of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from central.auth import Gateway
from central.errors import ApiError
from sync.protocol import Event, IngestBatch, Summary

log = logging.getLogger(__name__)

MAX_DETAILS = 50
LOG_EVERY_S = 60.0

# A CTE of ingest's statement (central/ingest.py, `limited`): the gateway's machine count and, of the batch's machines
# it does not have yet (`machine_ids`: the batch's, machine_ids()), those beyond `max_machines`, taken in machine id order. The
# statement writes nothing when `refused` is not empty; `max_machines` NULL: no limit.
REFUSED = """
SELECT k.known, coalesce(array_agg(n.machine_id ORDER BY n.machine_id)
                         FILTER (WHERE n.rank > %(max_machines)s::bigint - k.known), '{}') AS refused
FROM (SELECT count(*) AS known FROM machines WHERE gateway_id = %(gateway_id)s) AS k
LEFT JOIN (SELECT m.machine_id, row_number() OVER (ORDER BY m.machine_id) AS rank
           FROM unnest(%(machine_ids)s::text[]) AS m(machine_id)
           WHERE NOT EXISTS (SELECT FROM machines WHERE gateway_id = %(gateway_id)s AND machine_id = m.machine_id)
          ) AS n ON true
GROUP BY k.known
"""

_unlogged: dict[str, tuple[float, int]] = {}  # gateway name -> (when the next line may be logged, refusals since)


def machine_ids(batch: IngestBatch) -> str:
    """The machines a batch names (REFUSED's `machine_ids`), as a PostgreSQL array literal: one text parameter
    instead of a list psycopg dumps element by element (about 0.8 us per summary). Each is quoted (a machine named
    NULL stays a name); the protocol's names hold no quote or backslash."""
    ids = sorted({s.machine_id for s in batch.summaries} | {e.machine_id for e in batch.events})
    return '{"' + '","'.join(ids) + '"}' if ids else "{}"


def refusal(gateway: Gateway, batch: IngestBatch, known: int, refused: Sequence[str], limit: int) -> ApiError:
    """The 422 of a batch REFUSED found new machines in beyond the gateway's limit (nothing of it was stored), each
    refused record listed; logged at most once a minute per gateway."""
    message = f"gateway {gateway.name} has {known:,} machines, the limit is {limit:,}: a new machine is refused"
    named: list[tuple[str, Sequence[Summary | Event]]] = [("summaries", batch.summaries), ("events", batch.events)]
    refused_ids = set(refused)
    details = [{"loc": [kind, i, "machine_id"], "msg": message, "type": "too_many_machines"}
               for kind, items in named for i, item in enumerate(items) if item.machine_id in refused_ids]
    _log(gateway.name, len(details), known, limit)
    return ApiError(422, "too_many_machines", f"{len(refused_ids)} new machine(s) refused: {message}",
                    details[:MAX_DETAILS])


def _log(gateway: str, records: int, known: int, limit: int) -> None:
    next_at, count = _unlogged.get(gateway, (0.0, 0))
    count += records
    if time.monotonic() < next_at:
        _unlogged[gateway] = (next_at, count)
        return
    _unlogged[gateway] = (time.monotonic() + LOG_EVERY_S, 0)
    log.warning("gateway %s: %d record(s) of new machines refused since the last such line: it has %d machines, "
                "the limit is %d", gateway, count, known, limit)
