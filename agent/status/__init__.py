"""The local status API and the technician's page (SPEC §5): `create_app`, served by `StatusServer`.

Routes (JSON unless said otherwise; errors are `{"error": {"code", "message", "details"?}}`):
  GET /healthz                       liveness: the process answers; never needs the token
  GET /readyz                        the model is loaded and the store takes writes; 503 `not_ready` otherwise
  GET /api/v1/status                 the gateway: versions, model, uptime, buffer, sync, pipeline, drivers
  GET /api/v1/machines               each machine: latest values, state, health, per-mode risk, ood, a health trend
  GET /api/v1/machines/{machine_id}  the same with the inputs against their ranges, recent history and events; 404
  GET /api/v1/events                 alarm transitions, newest first: ?since=<ISO-8601 or epoch>&machine_id=&limit=
  GET /api/v1/alarms                 open alarm episodes with their acknowledgement and label (SPEC §10)
  POST /api/v1/alarms/{id}/acknowledge|label   a technician's action, recorded and synced to central (token only)
  GET /api/v1/openapi.json           the OpenAPI document
  GET /metrics                       Prometheus text, read from the agent's state at scrape time
  GET /                              the page (agent/static/status.html): one offline document, inline CSS and JS

Layers, outermost first: `_Guard` (security headers on every response, 500s included; the Host check; the bearer
token), CORS (only with `status.cors_origins`; a 401 from the guard carries no CORS headers), FastAPI (routes, JSON
error handlers).

Auth: with `status.token` set every route needs `Authorization: Bearer <token>` except `/healthz` and `/`: the page
is a static shell holding no data, and a browser cannot send a bearer header when it opens a URL, so the page asks
for the token and sends it with each request it makes. Without a token (config validation allows that on loopback
only) only requests naming a loopback host are answered, so a web page cannot reach the API by DNS rebinding.

Threads: uvicorn runs its event loop in a thread of its own; the routes are plain functions run in its worker
threads. Each reads one `AgentSnapshot` (agent/snapshot.py), never the agent's parts. The status API writes only
what a technician does about an alarm (acknowledge, label), through the snapshot's `actions` (agent/actions.py).

Modules: models (the response models), guard (the outermost layer, errors), routes (the app), gateway (/status,
/readyz), machines (a machine's fields, its detail, /events), listing (the /machines body, each machine's row encoded
once per change of it), alarms (/alarms and a technician's actions on them), metrics (/metrics, the per-machine
families rendered once per change), page (the page and its CSP), server (uvicorn in a thread; the app made at the
first request that needs it, `OnFirstUse`); each machine's newest reading, trend and saved alarm, and the version of
them, are agent/latest.py's, in memory.
"""

from agent.latest import TREND_POINTS
from agent.status.server import StatusServer

__all__ = ["TREND_POINTS", "StatusServer"]
