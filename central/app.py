"""The central API as an ASGI app: `create_app(settings)`; uvicorn (`pdm-central serve`) and gunicorn both use it.

Layers, outermost first:
  ProxyHeadersMiddleware  only when PDM_CENTRAL_TRUSTED_PROXIES is set: X-Forwarded-For/-Proto are believed from
                          those addresses only (the servers' own proxy handling is off, see central/server.py)
  SecurityHeaders         on every response, errors and 500s included
  FastAPI                 CORS (only when origins are configured), the routes, the JSON error handlers

Routes:
  GET  /api/v1/openapi.json     the OpenAPI document, development mode only (the agent's status API serves its own at
                                the same path); /openapi.json redirects there
  GET  /healthz                 the process answers (no database access)
  GET  /readyz                  PostgreSQL answers and the schema is the one this code needs; else 503
  POST /api/v1/ingest           a gateway's batch (SPEC §6), gateway token
  GET  /api/v1/gateways/{gateway_id}/desired   the gateway's desired state (SPEC §9; revision 0 until the downlink
                                exists), gateway token, ETag/If-None-Match: the agent's cheap token check each round
  GET  /api/v1/fleet            per gateway: last seen, machines by state, worst state, buffer backlog; ops token
  GET  /api/v1/machines         each machine's latest window, ?state=warning&state=alarm&gateway=...; ops token
  GET  /api/v1/gateways/{gateway}/machines/{machine_id}/summaries   ?since=&until=&limit=&cursor=; ops token
  GET  /api/v1/events           state changes, ?since=&until=&gateway=&machine_id=&state=&limit=&cursor=; ops token
  GET  /, /login; POST /login, /logout; GET /api/v1/dashboard/...   the fleet dashboard (central/dashboard.py)
  GET  /api/v1/alarms[/{id}]; POST /api/v1/alarms/{id}/acknowledge|comment|assign|label;
  GET  /api/v1/notifications/deliveries    alarm episodes, their audit log, the notifications' log (central/alarms.py)
Ops routes take the ops token as a bearer header, or the dashboard's session cookie. Refused credentials are
limited per client address (central/guard.py): 429 with Retry-After beyond 10 a minute.

An ingest stores its events, the alarm episodes they change (central/episodes.py) and the notifications those
changes owe (central/notify/) in one transaction; the notification worker runs as a task of the lifespan.

The pool opens without waiting for PostgreSQL: the API starts while the database is down, /readyz says so, and
every route that needs the database answers 503 {"error": {"code": "database_unavailable"}} with Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from central import __version__, alarms, conflicts, dashboard, db, guard, ingest, limits, ops
from central.auth import Gateway, GatewayCache, bearer_token, find_gateway, same_secret
from central.errors import ApiError, Error, body
from central.notify.service import Notifications
from central.params import Limit, Name, NameInPath, State, Time
from central.settings import Settings, SettingsError
from sync.protocol import IngestBatch, IngestResult

log = logging.getLogger("central")

OPENAPI = "/api/v1/openapi.json"  # both servers' documents: central's (development mode) and the agent's status API
RETRY_AFTER_S = "5"
READY_TIMEOUT_S = 1.5
JSON = "application/json"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000")
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 429: "too_many_requests"}



class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response, and HSTS in production when the request came over https."""

    def __init__(self, app: ASGIApp, hsts: bool) -> None:
        self.app, self.hsts = app, hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = SECURITY_HEADERS + ([HSTS] if self.hsts and scope.get("scheme") == "https" else [])

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = db.make_pool(settings)
        await pool.open(wait=False)
        app.state.pool = pool
        notifications.start(pool)
        log.info("pdm-central %s ready to serve (%s mode)", __version__, settings.mode,
                 extra={"settings": settings.redacted()})
        try:
            yield
        finally:
            await notifications.stop()
            await pool.close()

    development = not settings.production
    api = FastAPI(title="pdm-central", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=OPENAPI if development else None)
    api.state.settings = settings
    api.state.notifications = notifications
    if settings.cors_origins:
        api.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET"],
                           allow_headers=["Authorization"], max_age=600)
    _handlers(api)
    _routes(api, settings, notifications)
    if development:
        api.add_api_route("/openapi.json", lambda: RedirectResponse(OPENAPI, status_code=308), include_in_schema=False)
    _document(api)
    app: ASGIApp = SecurityHeaders(api, hsts=settings.production)
    if settings.trusted_proxies:
        app = ProxyHeadersMiddleware(app, trusted_hosts=[str(n) for n in settings.trusted_proxies])
    return app


def _document(api: FastAPI) -> None:
    """Complete the OpenAPI document: the ingest body's schema (sync.protocol.IngestBatch; the route reads its body
    itself for size limits and gzip, so FastAPI cannot see it); the one error envelope (central.errors.Error) on
    every 4xx and 5xx, in place of FastAPI's `{"detail": [...]}` for 422 that the API never answers; and 429 on
    every route that takes a credential (central/guard.py)."""
    generate = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schema = IngestBatch.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs"), IngestBatch=schema)
            document["paths"]["/api/v1/ingest"]["post"]["requestBody"] = {"required": True, "content": {
                JSON: {"schema": {"$ref": "#/components/schemas/IngestBatch"}}}}
            error = Error.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error.pop("$defs"), Error=error)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for item in document["paths"].values():
                for operation in item.values():
                    _error_responses(operation["responses"])
        return api.openapi_schema

    api.openapi = openapi


def _error_responses(responses: dict) -> None:
    if "401" in responses:
        responses["429"] = {"description": "too many refused credentials from this address: wait Retry-After "
                                           "seconds (the credential was not checked)"}
    for status, response in responses.items():
        if status[0] in "45":
            response["content"] = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
            if response.get("description") == "Validation Error":  # FastAPI's own, for its {"detail": ...}
                response["description"] = "invalid request; error.details lists the problems"


def error(status: int, code: str, message: str, details: list | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(code, message, details), status_code=status, headers=headers)


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


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


# SPEC §9's desired state before the downlink exists: nothing to apply. Its ETag lets the agent's check each round be
# a 304 without a body.
NOTHING_DESIRED = ('{"revision":0,"model":null,"shadow":null,"config":{"revision":0,"overrides":{}},'
                   '"acknowledgements":[]}')
NOTHING_DESIRED_ETAG = '"desired-0"'


def _routes(api: FastAPI, settings: Settings, notifications: Notifications) -> None:
    limit = settings.max_body_bytes
    gateways = GatewayCache()
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
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(request: Request) -> dict:
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
        etag = {"ETag": NOTHING_DESIRED_ETAG}
        if NOTHING_DESIRED_ETAG in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=etag)
        return Response(NOTHING_DESIRED, media_type=JSON, headers=etag)

    @api.post("/api/v1/ingest", response_model=IngestResult, responses={
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
                async with conn.transaction():  # the events, their episodes and notifications: all or nothing
                    await limits.refuse_machines_beyond_limit(conn, gateway, batch, settings.max_machines_per_gateway)
                    new_events: list = []
                    result = await ingest.store(conn, gateway, batch, _client(request), new_events)
                    notified = await notifications.after_store(conn, gateway.id, gateway.name, new_events)
                if result.duplicates.summaries:  # a resend; or a conflicting duplicate, which must not pass silently
                    await conflicts.record(conn, gateway, batch)
        except ingest.Revoked:
            gateways.drop(token)
            raise _unauthorized("unknown or revoked gateway token") from None
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # A value the schema let through and PostgreSQL refuses (the known ones are checked in ingest.parse): a
            # 500 would make the agent retry the batch forever; a 422 makes it isolate and set aside the record.
            log.warning("gateway %s: PostgreSQL refused batch %s: %s", gateway.name, batch.batch_id, exc)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ApiError(422, "invalid_batch", f"PostgreSQL refused a value of the batch: {reason}",
                           [{"loc": [], "msg": reason, "type": "database_refused"}]) from None
        if notified:
            notifications.wake()
        log.debug("gateway %s: batch %s stored", gateway.name, batch.batch_id,
                  extra={"accepted": result.accepted.model_dump(), "duplicates": result.duplicates.model_dump()})
        return Response(result.model_dump_json(), media_type=JSON)

    # The ops token is checked before the query parameters: without it, a 401 whatever else is wrong.
    ops_api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_ops)], responses={
        401: {"description": "missing or invalid ops token, or no dashboard session"},
        503: {"description": "database unavailable; retry later"}})

    @ops_api.get("/fleet")
    async def fleet(request: Request) -> Response:
        async with connection(request) as conn:
            return Response(await ops.fleet(conn), media_type=JSON)

    @ops_api.get("/machines")
    async def machines(request: Request, state: Annotated[list[State] | None, Query()] = None,
                       gateway: Name | None = None) -> Response:
        async with connection(request) as conn:
            return Response(await ops.machines(conn, state, gateway), media_type=JSON)

    @ops_api.get("/gateways/{gateway}/machines/{machine_id}/summaries", responses={
        404: {"description": "no gateway of that name, or it has sent nothing about the machine"}})
    async def machine_summaries(request: Request, gateway: NameInPath, machine_id: NameInPath,
                                since: Time | None = None, until: Time | None = None,
                                limit: Limit = 1000, cursor: str | None = None) -> Response:
        async with connection(request) as conn:
            return Response(await ops.summaries(conn, gateway, machine_id, since, until, limit, cursor),
                            media_type=JSON)

    @ops_api.get("/events")
    async def events(request: Request, since: Time | None = None, until: Time | None = None,
                     gateway: Name | None = None, machine_id: Name | None = None,
                     state: Annotated[list[State] | None, Query()] = None, limit: Limit = 1000,
                     cursor: str | None = None) -> Response:
        async with connection(request) as conn:
            return Response(await ops.events(conn, since, until, gateway, machine_id, state, limit, cursor),
                            media_type=JSON)

    api.include_router(ops_api)
    alarms.routes(api, settings, connection, require_ops)
    dashboard.routes(api, settings, connection, require_ops, guards.login)


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None

