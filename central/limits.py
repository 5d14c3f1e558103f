"""How many machines one gateway may have at central (issue 22 item 6): a gateway that invents machine ids (a
publisher on its broker did: 20,000 ids gave 20,003 machine rows) must not grow the fleet's tables without end.

A batch naming machines central does not know yet for this gateway, beyond `PDM_CENTRAL_MAX_MACHINES_PER_GATEWAY` (default 10,000), is refused
with 422 `too_many_machines`, each refused record listed. The agent answers a 422 as it does any invalid record: it
splits the batch until the refused records stand alone, sends the rest, and sets the refused ones aside in its
dead letters with this reason (counted in its `pdm_sync_set_aside_total`). Refusing, rather than accepting the
batch and dropping the records quietly, keeps what was refused visible on both sides; new machines within the
limit are taken in machine id order, so the split converges. Central logs the refusals once a minute per gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import psycopg

from central.auth import Gateway
from central.db import one_row
from central.errors import ApiError
from sync.protocol import Event, IngestBatch, Summary

log = logging.getLogger(__name__)

MAX_DETAILS = 50
LOG_EVERY_S = 60.0

# The gateway's machine count, and which of the batch's machines it does not have yet.
KNOWN_AND_NEW = """
SELECT (SELECT count(*) FROM machines WHERE gateway_id = %(gateway_id)s),
       coalesce((SELECT array_agg(m.machine_id ORDER BY m.machine_id) FROM unnest(%(ids)s::text[]) AS m(machine_id)
                 WHERE NOT EXISTS (SELECT 1 FROM machines WHERE gateway_id = %(gateway_id)s
                                   AND machine_id = m.machine_id)), '{}')
"""

_unlogged: dict[str, tuple[float, int]] = {}  # gateway name -> (when the next line may be logged, refusals since)


async def refuse_machines_beyond_limit(conn: psycopg.AsyncConnection, gateway: Gateway, batch: IngestBatch,
                                       limit: int) -> None:
    """Raise 422 when the batch names new machines beyond the gateway's limit; nothing is stored then."""
    ids = sorted({s.machine_id for s in batch.summaries} | {e.machine_id for e in batch.events})
    if not ids:
        return
    known, new = await one_row(conn, KNOWN_AND_NEW, {"gateway_id": gateway.id, "ids": ids})
    refused = set(new[max(0, limit - known):])
    if not refused:
        return
    message = f"gateway {gateway.name} has {known:,} machines, the limit is {limit:,}: a new machine is refused"
    named: list[tuple[str, Sequence[Summary | Event]]] = [("summaries", batch.summaries), ("events", batch.events)]
    details = [{"loc": [kind, i, "machine_id"], "msg": message, "type": "too_many_machines"}
               for kind, items in named for i, item in enumerate(items) if item.machine_id in refused]
    _log(gateway.name, len(details), known, limit)
    raise ApiError(422, "too_many_machines", f"{len(refused)} new machine(s) refused: {message}",
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
