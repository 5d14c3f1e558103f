"""The central API as an ASGI app: `create_app(settings)`; uvicorn (`pdm-central serve`) and gunicorn both use it.

Layers, outermost first:
  ProxyHeadersMiddleware  only when PDM_CENTRAL_TRUSTED_PROXIES is set: X-Forwarded-For/-Proto are believed from
                          those addresses only (the servers' own proxy handling is off, see central/server.py)
  SecurityHeaders         on every response, errors and 500s included
  FastAPI                 BodyLimit (a body over 64 KiB answered 413 before a route reads it, except the ingest's,
                          which streams with its own cap: web/http.py), CORS (only when origins are configured),
                          the routes, the JSON error handlers

Routes:
  GET  /api/v1/openapi.json     the OpenAPI document, development mode only (the agent's status API serves its own at
                                the same path); /openapi.json redirects there
  GET  /healthz                 the process answers (no database access)
  GET  /readyz                  PostgreSQL answers and the schema is the one this code needs; else 503
  POST /api/v1/ingest           a gateway's batch (SPEC §6), gateway token
  GET  /api/v1/gateways/{gateway_id}/desired   the gateway's desired state (SPEC §9, central/fleet/desired.py),
                                gateway token, ETag/If-None-Match: a 304 when nothing changed
  GET  /api/v1/models/{name}/{version}/bundle  a signed model bundle (model/bundle.py), gateway token
  GET  /api/v1/rollouts/current  the running (or last) rollout, its gates and each gateway's figures; ops token
  GET  /api/v1/fleet            per gateway: last seen, machines by state, worst state, buffer backlog; ops token
  GET  /api/v1/machines         each machine's latest window, ?state=warning&state=alarm&gateway=...; ops token
  GET  /api/v1/gateways/{gateway}/machines/{machine_id}/summaries   ?since=&until=&limit=&cursor=; ops token
  GET  /api/v1/events           state changes, ?since=&until=&gateway=&machine_id=&state=&limit=&cursor=; ops token
  GET  /, /login; POST /login, /logout; GET /api/v1/dashboard/...   the fleet dashboard (central/dashboard.py)
  GET  /api/v1/alarms[/{id}]; POST /api/v1/alarms/{id}/acknowledge|comment|assign|label;
  GET  /api/v1/notifications/deliveries    alarm episodes, their audit log, the notifications' log (central/alarms.py)
Ops routes take the ops token as a bearer header, or the dashboard's session cookie. Refused credentials are
limited per client address (central/guard.py): 429 with Retry-After beyond 10 a minute.

An ingest stores its events, the alarm episodes they change (central/episodes.py), the notifications those
changes owe (central/notify/) and the actions technicians took at the gateway (central/gateway_actions.py) in one
transaction; the notification worker runs as a task of the lifespan (PDM_CENTRAL_NOTIFY_WORKER=inline) or in its own
process (`pdm-central notify`, central/notify/process.py).

The pool opens without waiting for PostgreSQL: the API starts while the database is down, /readyz says so, and
every route that needs the database answers 503 {"error": {"code": "database_unavailable"}} with Retry-After.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from central import (
    __version__,
    alarms,
    dashboard,
    db,
    gateway_actions,
    guard,
    ingest,
    ops,
    partitions,
    replica,
)
from central.auth import Gateway, GatewayCache, bearer_token, find_gateway, same_secret
from central.errors import ApiError
from central.fleet import bundles as fleet_bundles
from central.fleet import desired as fleet_desired
from central.fleet import rollout as fleet_rollout
from central.fleet.task import RolloutTask
from central.notify.service import Notifications
from central.params import Limit, Name, NameInPath, Time
from central.settings import Settings, SettingsError
from model.states import StateName
from sync.desired import etag as desired_etag
from sync.protocol import IngestBatch, IngestResult
from web.http import STATUS_CODES, BodyLimit, ErrorResponse, SecurityHeaders, error_body
from web.logs import first_line

INGEST = "/api/v1/ingest"
log = logging.getLogger("central")

OPENAPI = "/api/v1/openapi.json"  # both servers' documents: central's (development mode) and the agent's status API
RETRY_AFTER_S = "5"
READY_TIMEOUT_S = 1.5
JSON = "application/json"


def create_app(settings: Settings | None = None) -> ASGIApp:
    """The API; SettingsError when production mode refuses the settings. Without `settings`, from the environment
    (how gunicorn calls it: `central.app:create_app()`)."""
    if settings is None:
        from central.settings import load_settings

        settings = load_settings()
    problems = settings.serving_problems()
    if problems:
        raise SettingsError(problems)
    notifications = Notifications.from_settings(settings)
    maintenance = partitions.Maintenance(settings)
    reads = replica.Reads(settings)
    rollouts = RolloutTask(settings.rollout_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = db.make_pool(settings)
        await pool.open(wait=False)
        app.state.pool = pool
        await reads.open()
        notifications.start(pool)
        maintenance.start(pool)
        rollouts.start(pool)
        log.info("pdm-central %s ready to serve (%s mode)", __version__, settings.mode,
                 extra={"settings": settings.redacted()})
        try:
            yield
        finally:
            await notifications.stop()
            await maintenance.stop()
            await rollouts.stop()
            await reads.close()
            await pool.close()

    development = not settings.production
    api = FastAPI(title="pdm-central", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=OPENAPI if development else None)
    api.state.settings = settings
    api.state.notifications = notifications
    api.state.maintenance = maintenance
    api.state.reads = reads
    if settings.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET"],
                           allow_headers=["Authorization"], max_age=600)
    api.add_middleware(BodyLimit, exempt=frozenset({INGEST}))
    _handlers(api)
    _routes(api, settings, notifications)
    if development:
        api.add_api_route("/openapi.json", lambda: RedirectResponse(OPENAPI, status_code=308), include_in_schema=False)
    _document(api)
    app: ASGIApp = SecurityHeaders(api, hsts=settings.production)
    if settings.trusted_proxies:
        # uvicorn types an ASGI app with its own TypedDicts, starlette with mappings: the same protocol
        trusted = [str(n) for n in settings.trusted_proxies]
        app = ProxyHeadersMiddleware(app, trusted_hosts=trusted)  # type: ignore[arg-type,assignment]
    return app


def _document(api: FastAPI) -> None:
    """Complete the OpenAPI document: the ingest body's schema (sync.protocol.IngestBatch; the route reads its body
    itself for size limits and gzip, so FastAPI cannot see it); the one error envelope (web.http.ErrorResponse,
    named Error) on every 4xx and 5xx, in place of FastAPI's `{"detail": [...]}` for 422 that the API never
    answers; and 429 on every route that takes a credential (central/guard.py)."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = api.openapi_schema = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schema = IngestBatch.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs"), IngestBatch=schema)
            document["paths"][INGEST]["post"]["requestBody"] = {"required": True, "content": {
                JSON: {"schema": {"$ref": "#/components/schemas/IngestBatch"}}}}
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error.pop("$defs"), Error={**error, "title": "Error"})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for item in document["paths"].values():
                for operation in item.values():
                    _error_responses(operation["responses"])
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend its document


def _error_responses(responses: dict[str, dict[str, Any]]) -> None:
    if "401" in responses:
        responses["429"] = {"description": "too many refused credentials from this address: wait Retry-After "
                                           "seconds (the credential was not checked)"}
    for status, response in responses.items():
        if status[0] in "45":
            response["content"] = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
            if response.get("description") == "Validation Error":  # FastAPI's own, for its {"detail": ...}
                response["description"] = "invalid request; error.details lists the problems"


def error(status: int, code: str, message: str, details: list[Any] | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @api.exception_handler(db.DatabaseUnavailable)
    async def unavailable(request: Request, exc: db.DatabaseUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error(503, "database_unavailable", str(exc), headers={"Retry-After": RETRY_AFTER_S})

    @api.exception_handler(db.SchemaMismatch)
    async def schema(request: Request, exc: db.SchemaMismatch) -> JSONResponse:
        log.error("%s", exc)
        return error(503, "schema_outdated", str(exc), headers={"Retry-After": RETRY_AFTER_S})

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, STATUS_CODES.get(exc.status_code, "error"), str(exc.detail),
                     headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return error(422, "invalid_request", "the request is not valid", details)

    @api.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, "internal", "internal error; the server log has the details")


@asynccontextmanager
async def connection(request: Request, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
    """A pooled connection (waiting at most `timeout`, default db_timeout_s); connection failures become
    DatabaseUnavailable, a missing table SchemaMismatch."""
    try:
        async with request.app.state.pool.connection(timeout) as conn:
            yield conn
    except db.UNAVAILABLE as exc:
        raise db.unavailable(exc) from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise db.SchemaMismatch(f"the database schema is not this version's ({exc}); run `pdm-central migrate`") \
            from exc


@asynccontextmanager
async def read_connection(request: Request) -> AsyncIterator[tuple[psycopg.AsyncConnection, replica.Source]]:
    """For the dashboard's and the ops API's reads: the replica when one is configured and up, else the primary
    (central/replica.py); errors mapped as by `connection`."""
    try:
        async with request.app.state.reads.connection(request.app.state.pool) as (conn, source):
            yield conn, source
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        raise db.SchemaMismatch(f"the database schema is not this version's ({exc}); run `pdm-central migrate`") \
            from exc


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})




def _routes(api: FastAPI, settings: Settings, notifications: Notifications) -> None:
    limit = settings.max_body_bytes
    gateways = GatewayCache()
    known_partitions = partitions.Partitions()
    guards = guard.Guards()
    ops_token = settings.ops_token.get_secret_value() if settings.ops_token else None

    async def require_ops(request: Request) -> None:
        token = bearer_token(request.headers.get("authorization"))
        if ops_token is None:
            raise _unauthorized("the ops API is off: no PDM_CENTRAL_OPS_TOKEN is configured")
        if token is not None:
            guard.check(guards.ops, request)
            if same_secret(token, ops_token):
                return
            guard.refused(guards.ops, request)
        if token is None and dashboard.cookie_name(settings) in request.cookies:
            async with connection(request) as conn:
                if await dashboard.session_valid(conn, request, settings):
                    return
        raise _unauthorized("missing or invalid ops token (Authorization: Bearer <ops token>) or dashboard session")

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(request: Request) -> dict[str, Any]:
        # Answer within a probe's usual 2-3 s timeout, whatever db_timeout_s is.
        async with connection(request, timeout=min(READY_TIMEOUT_S, settings.db_timeout_s)) as conn:
            version = await db.schema_version_async(conn)
        if version != db.latest_version():
            raise db.SchemaMismatch(f"the database schema is at version {version}, this pdm-central needs "
                                    f"{db.latest_version()}: run `pdm-central migrate`")
        return {"status": "ready", "schema_version": version}

    async def gateway_of(request: Request, token: str, fresh: bool = False) -> Gateway:
        """The active gateway holding `token`; 401 (and a refusal counted against the client) when none does.
        `fresh`: ask the database, not the cache (a revoked token is refused at once, not after the cache's TTL).
        A token found valid within the cache's TTL is not held back by the address's limit: gateways behind one NAT
        keep syncing while a mis-provisioned neighbour collects refusals."""
        cached = gateways.get(token)
        if cached is None:
            guard.check(guards.gateway, request)
        gateway = None if fresh else cached
        if gateway is None:
            async with connection(request) as conn:
                gateway = await find_gateway(conn, token)
            if gateway is not None:
                gateways.put(token, gateway)
        if gateway is None:
            gateways.drop(token)
            guard.refused(guards.gateway, request)
            raise _unauthorized("unknown or revoked gateway token")
        return gateway

    @api.get("/api/v1/gateways/{gateway_id}/desired", responses={
        304: {"description": "If-None-Match holds the current ETag: nothing changed"},
        401: {"description": "missing, unknown or revoked gateway token"},
        403: {"description": "gateway_id is not the token's gateway"},
        503: {"description": "database unavailable; retry later"}})
    async def desired(request: Request, gateway_id: NameInPath) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise _unauthorized("missing gateway token (Authorization: Bearer <token>)")
        gateway = await gateway_of(request, token, fresh=True)  # one index probe: the check must be current
        if gateway.name != gateway_id:
            raise ApiError(403, "forbidden", f"this token belongs to another gateway than {gateway_id!r}")
        async with connection(request) as conn:
            state = await fleet_desired.read(conn, gateway.id)
            acknowledged = await gateway_actions.acknowledgements(conn, gateway.id)
        state = state.model_copy(update={"acknowledgements": acknowledged})
        etag = {"ETag": desired_etag(state.revision, acknowledged)}
        if etag["ETag"] in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=etag)
        return Response(state.model_dump_json(), media_type=JSON, headers=etag)

    @api.get("/api/v1/models/{name}/{version}/bundle", responses={
        200: {"content": {"application/x-tar": {}}, "description": "the signed bundle (model/bundle.py)"},
        401: {"description": "missing, unknown or revoked gateway token"},
        404: {"description": "no such bundle"},
        503: {"description": "database unavailable; retry later"}})
    async def model_bundle(request: Request, name: NameInPath, version: NameInPath) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise _unauthorized("missing gateway token (Authorization: Bearer <token>)")
        await gateway_of(request, token, fresh=True)  # the cache is ingest's (its STORE checks the token again)
        async with connection(request) as conn:
            data = await fleet_bundles.bundle_bytes(conn, name, version)
        if data is None:
            raise ApiError(404, "not_found", f"no bundle {name} {version}")
        return Response(data, media_type="application/x-tar")

    @api.post(INGEST, response_model=IngestResult, responses={
        400: {"description": "invalid Content-Length, or a body that is not valid gzip"},
        401: {"description": "missing, unknown or revoked gateway token"},
        403: {"description": "gateway_id is not the token's gateway"},
        413: {"description": "body or decompressed body over PDM_CENTRAL_MAX_BODY_BYTES"},
        415: {"description": "not JSON, or an encoding other than gzip"},
        422: {"description": "invalid batch, or new machines beyond the gateway's limit (too_many_machines); "
                            "error.details lists the problems"},
        503: {"description": "database unavailable; retry later"}})
    async def ingest_batch(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise _unauthorized("missing gateway token (Authorization: Bearer <token>)")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != JSON:
            raise ApiError(415, "unsupported_media_type", f"send Content-Type: {JSON}")
        gateway = await gateway_of(request, token)
        raw = ingest.decode(await ingest.read_body(request, limit), request.headers.get("content-encoding"), limit)
        batch = ingest.parse(raw)
        if batch.gateway_id != gateway.name:
            log.warning("gateway %s sent a batch as %r", gateway.name, batch.gateway_id)
            raise ApiError(403, "forbidden", f"this token belongs to another gateway than {batch.gateway_id!r}")
        try:
            async with connection(request) as conn:
                await known_partitions.ensure_for(conn, batch)
                # The events, their episodes and notifications, the actions: all or nothing. A batch of summaries
                # alone is one statement (ingest.STORE, with the machine limit and the conflicting duplicates),
                # atomic without a transaction block: no BEGIN and COMMIT round trips.
                atomic = conn.transaction() if batch.events or batch.actions else nullcontext()
                async with atomic:
                    new_events: list[uuid.UUID] = []
                    result = await ingest.store(conn, gateway, batch, _client(request), new_events,
                                                settings.max_machines_per_gateway)
                    await notifications.after_store(conn, gateway.id, gateway.name, new_events)
                    if batch.actions:  # after the events: an action's episode may have opened in this batch
                        result = result.model_copy(update={"actions": await gateway_actions.apply(
                            conn, gateway.id, gateway.name, batch.actions, ingest.address(_client(request)))})
        except ingest.Revoked:
            gateways.drop(token)
            raise _unauthorized("unknown or revoked gateway token") from None
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            if partitions.is_missing_partition(exc):  # dropped by retention since this process saw it: a retry
                known_partitions.forget()             # creates it again
                log.warning("gateway %s: batch %s: %s; answered 503 (the retry creates it)", gateway.name,
                            batch.batch_id, str(exc).strip().splitlines()[0])
                raise db.DatabaseUnavailable("a partition this batch needs was just dropped; retry") from None
            # A value the schema let through and PostgreSQL refuses (the known ones are checked in ingest.parse): a
            # 500 would make the agent retry the batch forever; a 422 makes it isolate and set aside the record.
            log.warning("gateway %s: PostgreSQL refused batch %s: %s", gateway.name, batch.batch_id, exc)
            reason = first_line(exc)
            raise ApiError(422, "invalid_batch", f"PostgreSQL refused a value of the batch: {reason}",
                           [{"loc": [], "msg": reason, "type": "database_refused"}]) from None
        log.debug("gateway %s: batch %s stored", gateway.name, batch.batch_id,
                  extra={"accepted": result.accepted.model_dump(), "duplicates": result.duplicates.model_dump()})
        # Without `actions` unless the batch had some: an agent older than them reads the answer with a strict model.
        return Response(result.model_dump_json(exclude_none=True), media_type=JSON)

    # The ops token is checked before the query parameters: without it, a 401 whatever else is wrong.
    ops_api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_ops)], responses={
        401: {"description": "missing or invalid ops token, or no dashboard session"},
        503: {"description": "database unavailable; retry later"}})

    @ops_api.get("/rollouts/current", responses={404: {"description": "no rollout was ever started"}})
    async def current_rollout(request: Request) -> Response:
        async with connection(request) as conn:
            found = await fleet_rollout.status(conn)
        if found is None:
            raise ApiError(404, "not_found", "no rollout was ever started")
        return Response(found.model_dump_json(), media_type=JSON)

    @ops_api.get("/fleet")
    async def fleet(request: Request) -> Response:
        async with read_connection(request) as (conn, _):
            return Response(await ops.fleet(conn), media_type=JSON)

    @ops_api.get("/machines")
    async def machines(request: Request, state: Annotated[list[StateName] | None, Query()] = None,
                       gateway: Name | None = None) -> Response:
        async with read_connection(request) as (conn, _):
            return Response(await ops.machines(conn, state, gateway), media_type=JSON)

    @ops_api.get("/gateways/{gateway}/machines/{machine_id}/summaries", responses={
        404: {"description": "no gateway of that name, or it has sent nothing about the machine"}})
    async def machine_summaries(request: Request, gateway: NameInPath, machine_id: NameInPath,
                                since: Time | None = None, until: Time | None = None,
                                limit: Limit = 1000, cursor: str | None = None) -> Response:
        async with read_connection(request) as (conn, _):
            return Response(await ops.summaries(conn, gateway, machine_id, since, until, limit, cursor),
                            media_type=JSON)

    @ops_api.get("/events")
    async def events(request: Request, since: Time | None = None, until: Time | None = None,
                     gateway: Name | None = None, machine_id: Name | None = None,
                     state: Annotated[list[StateName] | None, Query()] = None, limit: Limit = 1000,
                     cursor: str | None = None) -> Response:
        async with read_connection(request) as (conn, _):
            return Response(await ops.events(conn, since, until, gateway, machine_id, state, limit, cursor),
                            media_type=JSON)

    api.include_router(ops_api)
    alarms.routes(api, settings, connection, require_ops)
    dashboard.routes(api, settings, connection, require_ops, guards.login, read_connection)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None

